"""The input pipelines: Grain datasets of this process's share of every global batch, exact
padded evaluation, and `train_batches`, the one train-data interface the trainer iterates
whichever way the batches are made (`TrainBatches`: `next()` a global batch on the devices,
`close()`).

* `train_dataset(...)` is an endless, shuffled, augmented, batched Grain `IterDataset` of this
  process's slice of each global batch. Its order depends only on the seed (never on the number
  of worker processes), each epoch reshuffles with seed + epoch, and global batch s is a pure
  function of (seed, s): a run resumes at step s with `start_batch=s`, on any topology.
* `eval_dataset(...)` visits every example of the split exactly once over all processes: the
  last batches are padded and carry `mask`, so metrics are masked sums over real examples.
* The train batches of a run come either from these (host decoding, then device prefetch:
  resnet_jax.prefetch) or from the split kept on the devices (resnet_jax.in_memory).

Batches are dicts of numpy arrays: `image` uint8 (N, H, W, 3), `label` int32 (N,), and for
eval `mask` bool (N,). `resnet_jax.sharding.global_batch` turns them into global jax.Arrays.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import chex
import grain
import jax
import numpy as np

from resnet_jax import in_memory, prefetch, sharding, workers
from resnet_jax.preprocessing import Preprocess
from resnet_jax.sources import DatasetInfo, Record, read_encoded


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f'process_index {index} is outside [0, {count})')
    return index, count


def _check_batch(batch_size: int) -> None:
    try:
        sharding.check_batch_size(batch_size, 1, 1)  # this process's share: only its sign
    except ValueError as e:
        raise ValueError(f'batch_size {batch_size!r} {e}') from None


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the examples: a permutation from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


# Each process decodes and augments one image per thread: OpenCV's own threads inside each
# call would compete with Grain's workers and the read threads for the same cores (on this
# 2-core machine they made in-process reading slower when threads were added).
_OPENCV_THREADS_SET: set[int] = set()


def _one_opencv_thread() -> None:
    if os.getpid() not in _OPENCV_THREADS_SET:
        import cv2

        cv2.setNumThreads(1)
        _OPENCV_THREADS_SET.add(os.getpid())


_POOLS: dict[tuple[int, int], concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def map_examples(fn: Callable[[int], Record], count: int, threads: int) -> list[Record]:
    """[fn(0), ..., fn(count - 1)], by `threads` threads of this process (1: one after another).

    The examples of a batch are decoded and augmented in parallel (OpenCV and numpy release
    the GIL); each has its own random generator, so the results do not depend on `threads`.
    """
    if threads <= 1 or count <= 1:
        return [fn(j) for j in range(count)]
    key = (os.getpid(), threads)  # a pool per process: Grain's workers are processes
    with _POOLS_LOCK:  # the prefetch thread and an evaluation may ask at once
        if key not in _POOLS:
            _POOLS[key] = concurrent.futures.ThreadPoolExecutor(threads, 'resnet_jax-read')
        pool = _POOLS[key]
    return list(pool.map(fn, range(count)))


def _stack(examples: list[Record]) -> Record:
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


@dataclasses.dataclass(frozen=True)
class _ReadSliceOfGlobalBatch:
    """Global batch b of the shuffled stream: this process's slice of it, read and augmented.

    A pure function of b (plus the seed): epoch e = b // batches_per_epoch visits the examples in
    `epoch_order(seed, e)`, global batch b takes the next `global_batch_size` of them (the last
    partial batch of an epoch is dropped), and the example at position j of the global batch is
    augmented with the generator (seed, b, j). Nothing depends on how many processes or devices
    share the batch, so the batches and the losses are the same on any topology, and a run
    resumed at step s (on any topology) continues with exactly global batch s.

    The slice's records are read at once (one ArrayRecord read is a fraction of the cost of
    one read per record), their images still encoded; each example is then decoded and
    augmented on its own, `threads` at a time (`map_examples`).
    """

    source: Any
    preprocess: Callable[[Record, np.random.Generator], Record]
    seed: int
    global_batch_size: int
    start: int  # position of this process's first example in each global batch
    size: int  # examples per process
    threads: int = 1

    def __call__(self, b: int) -> Record:
        _one_opencv_thread()
        n = len(self.source)
        epoch, position = divmod(b, n // self.global_batch_size)
        first = position * self.global_batch_size + self.start
        indices = epoch_order(self.seed, epoch, n)[first : first + self.size]
        records = read_encoded(self.source, indices.tolist())

        def example(j: int) -> Record:
            return self.preprocess(
                records[j], np.random.default_rng([self.seed, b, self.start + j])
            )

        batch = _stack(map_examples(example, len(records), self.threads))
        # The loader's boundary: uint8 images of one shape, one label each (checked once here,
        # not in each consumer).
        chex.assert_type(batch['image'], np.uint8)
        chex.assert_shape(batch['image'], (self.size, None, None, 3))
        chex.assert_shape(batch['label'], (self.size,))
        return batch


@dataclasses.dataclass(frozen=True)
class Reading:
    """How this process reads its share of each batch.

    Attributes:
      num_workers: Grain worker processes, each making whole batches in turn (0: in this
        process).
      read_threads: threads per process that decode and augment the images of a batch in
        parallel (1: one after another). The batches are identical for any number of workers
        and threads.
      process_index, process_count: whose slice of each global batch (default: JAX's).
    """

    num_workers: int = 0
    read_threads: int = 1
    process_index: int | None = None
    process_count: int | None = None

    @classmethod
    def of(cls, dataset: Any) -> Reading:
        """The workers and threads of a config's `dataset` section."""
        return cls(dataset.num_workers, dataset.read_threads)


def train_dataset(
    source: Sequence[Record],
    preprocess: Callable[[Record, np.random.Generator], Record],
    *,
    batch_size: int,
    seed: int,
    start_batch: int = 0,
    reading: Reading = Reading(),
) -> grain.IterDataset:
    """Endless shuffled, augmented batches: this process's slice of each global batch.

    The global batches (batch_size x process_count examples) are the same whatever the number
    of processes: process i reads examples [i * batch_size, (i + 1) * batch_size) of each, so
    the processes read disjoint examples and together exactly the global batch. The first
    element is global batch `start_batch`: the trainer resumes at step s with start_batch=s, so
    a checkpoint needs no iterator state, and none that depends on the topology.

    Args:
      source: from `open_split`.
      preprocess: from `make_preprocess(..., train=True)`.
      batch_size: this process's batch (the global batch / the number of processes; see
        `resnet_jax.sharding.local_batch_size`).
      seed: the shuffle and augmentation seed (a non-negative int).
      start_batch: the global batch to start from (the number of steps already taken).
      reading: workers, threads and this process's slice (`Reading`).
    """
    _check_batch(batch_size)
    _check_count(reading.read_threads, 'read_threads', minimum=1)
    index, count = _process(reading.process_index, reading.process_count)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be an int >= 0, got {seed!r}')
    global_batch_size = batch_size * count
    if len(source) < global_batch_size:
        raise ValueError(
            f'the global batch of {global_batch_size} ({count} processes x {batch_size}) exceeds '
            f'the {len(source)} examples of the split'
        )
    read = _ReadSliceOfGlobalBatch(
        source,
        preprocess,
        int(seed),
        global_batch_size,
        index * batch_size,
        batch_size,
        int(reading.read_threads),
    )
    if not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
        raise ValueError(f'start_batch must be an int >= 0, got {start_batch!r}')
    batches = grain.MapDataset.range(int(start_batch), 2**62)  # global batch numbers, endless
    return _prefetch(batches.map(read), reading.num_workers)


def _check_count(value: Any, what: str, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f'{what} must be an int >= {minimum}, got {value!r}')


# Batches are made on demand, by the caller (the trainer's device-prefetch thread) or by Grain's
# workers, which keep one each ready. Grain's default (16 threads, 500 elements read ahead)
# would hold hundreds of batches in memory (38 MB each for 256 images at 224) and run threads
# on top of the read threads and the workers.
_ON_DEMAND = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _prefetch(dataset: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    _check_count(num_workers, 'num_workers')
    iterable = dataset.to_iter_dataset(_ON_DEMAND)
    if not num_workers:
        return iterable
    from absl import flags

    # Grain reads absl flags; outside an absl app nobody has parsed them: take the defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return workers.prefetch(iterable, num_workers)


@dataclasses.dataclass(frozen=True)
class _ReadEvalBatch:
    """Eval batch k of this process's shard (examples index, index + count, ... of the split):
    its real examples, then masked-out zero copies of one up to the batch size."""

    source: Any
    preprocess: Callable[[Record], Record]
    index: int
    count: int
    batch_size: int
    threads: int = 1

    def __call__(self, k: int) -> Record:
        _one_opencv_thread()
        shard_size = len(range(self.index, len(self.source), self.count))
        positions = range(k * self.batch_size, min((k + 1) * self.batch_size, shard_size))
        records = read_encoded(self.source, [self.index + p * self.count for p in positions])
        examples = map_examples(lambda j: self.preprocess(records[j]), len(records), self.threads)
        padding = self.batch_size - len(examples)
        if padding:
            like = examples[0] if examples else self.preprocess(self.source[0])
            examples += [{key: np.zeros_like(v) for key, v in like.items()}] * padding
        batch = _stack(examples)
        batch['mask'] = np.arange(self.batch_size) < len(records)
        return batch


def eval_dataset(
    source: Sequence[Record],
    preprocess: Callable[[Record], Record],
    *,
    batch_size: int,
    reading: Reading = Reading(),
) -> grain.IterDataset:
    """Every example of the split exactly once over all processes, in padded, masked batches.

    Every process yields the same number of batches (a jitted eval step is collective), so
    shards shorter than the longest are padded too. Workers and threads as `train_dataset`.
    """
    _check_batch(batch_size)
    _check_count(reading.read_threads, 'read_threads', minimum=1)
    index, count = _process(reading.process_index, reading.process_count)
    longest_shard = math.ceil(len(source) / count)
    num_batches = math.ceil(longest_shard / batch_size)
    threads = int(reading.read_threads)
    read = _ReadEvalBatch(source, preprocess, index, count, batch_size, threads)
    return _prefetch(grain.MapDataset.range(num_batches).map(read), reading.num_workers)


class TrainBatches(Protocol):
    """The global train batches of a run, on the devices, from its first step on; the trainer
    sees only this, however they are made (`train_batches`)."""

    def __next__(self) -> dict[str, jax.Array]: ...

    def close(self) -> None: ...


def train_batches(
    config: Any,
    source: Sequence[Record],
    info: DatasetInfo,
    preprocess: Preprocess,
    mesh: Any,
    first_step: int,
) -> TrainBatches:
    """The run's train batches from global batch `first_step` on, made as `config` says: drawn
    on the devices (`dataset.in_memory`), or read on the host by Grain and prefetched to the
    devices. The stream is a function of the step: resuming needs no iterator state, and
    batches prefetched past the end of a run are dropped."""
    if config.dataset.in_memory:
        return in_memory.InMemoryBatches(
            source,
            preprocess,
            mesh=mesh,
            batch_size=config.batch_size,
            seed=config.seed,
            start_step=first_step,
        )
    host_batches: Iterator = iter(
        train_dataset(
            source,
            preprocess,
            batch_size=sharding.local_batch_size(config.batch_size, mesh),
            seed=config.seed,
            start_batch=first_step,
            reading=Reading.of(config.dataset),
        )
    )
    return prefetch.prefetch_to_device(
        host_batches, lambda local: sharding.global_batch(local, mesh), config.prefetch_batches
    )
