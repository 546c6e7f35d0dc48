"""The in-memory train stream (`dataset.in_memory`), the fast path for fixed-size datasets such
as CIFAR: the split decoded once into uint8 arrays kept on the devices (rows sharded over the
mesh), and every global batch drawn and augmented there, inside jit, from (seed, step).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import augment, sharding
from resnet_jax.preprocessing import check_record
from resnet_jax.sources import DatasetInfo, Record, read_many


def load_arrays(source: Sequence[Record], info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a whole split once into uint8 images (N, H, W, 3) and int32 labels (N,)."""
    if info.image_shape is None:
        raise ValueError(
            f'{info.name} has images of varied sizes; the in-memory path needs a fixed shape'
        )
    images = np.empty((len(source), *info.image_shape), np.uint8)
    labels = np.empty((len(source),), np.int32)
    for start in range(0, len(source), 2000):
        indices = range(start, min(start + 2000, len(source)))
        for i, record in zip(indices, read_many(source, indices), strict=True):
            images[i], labels[i] = check_record(record, info)
    return images, labels


_DEFAULT_CONTEXT = augment.Context()


def in_memory_indices(
    key: jax.Array, step: jax.Array, num_examples: int, batch_size: int
) -> jax.Array:
    """The examples of global batch `step` of the in-memory stream, a pure function of (key,
    step): epoch e visits the examples in a permutation drawn from fold_in(key, e), and the
    last partial batch of an epoch is dropped, as the host path does."""
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:  # shapes are static: this runs once, at trace time
        raise ValueError(f'batch_size {batch_size} exceeds the {num_examples} examples in memory')
    epoch, position = jnp.divmod(step, steps_per_epoch)
    permutation = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return jax.lax.dynamic_slice(permutation, (position * batch_size,), (batch_size,))


@dataclasses.dataclass(frozen=True)
class DeviceAugmentation:
    """The device versions of a chain of augmentations, with their context (hashable: a static
    argument of the jitted draw)."""

    ops: tuple[augment.Augmentation, ...]
    ctx: augment.Context = _DEFAULT_CONTEXT


@functools.partial(jax.jit, static_argnames=('batch_size', 'num_examples', 'augmentation'))
def in_memory_train_batch(
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    step: jax.Array,
    *,
    batch_size: int,
    num_examples: int | None = None,
    augmentation: DeviceAugmentation | None = None,
) -> dict[str, jax.Array]:
    """Global batch `step` of the in-memory train stream: shuffled and augmented, uint8 as the
    host pipeline's batches (the train step normalises them).

    A pure function of (key, step) (`in_memory_indices`): resuming needs only the step, on any
    number of devices. The augmentation is `augmentation`'s device versions (default:
    `augment.pad_crop_flip_batch`), with the same distributions as the host's.

    Args:
      images, labels: the split, on the devices, whole on each or with its rows sharded over
        the mesh (`shard_rows`); rows from `num_examples` on are padding, never drawn (default:
        none). From sharded rows, XLA gathers a batch as a masked pick on each device and one
        all-reduce of the batch (tests/test_in_memory.py checks that the dataset itself never
        crosses between devices).
    """
    num_examples = images.shape[0] if num_examples is None else num_examples
    indices = in_memory_indices(key, step, num_examples, batch_size)
    images, labels = images[indices], labels[indices]
    augment_key = jax.random.fold_in(jax.random.fold_in(key, step), 1)
    if augmentation is None:
        images = augment.pad_crop_flip_batch(images, augment_key)
    else:
        images = augment.apply_device(augmentation.ops, images, augment_key, augmentation.ctx)
    return {'image': images, 'label': labels}


def shard_rows(array: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """`array` on the mesh's devices with its rows split over the data axis (padded with zero
    rows to a multiple of the device count); each process places only its devices' rows."""
    padding = -len(array) % mesh.devices.size
    if padding:
        array = np.concatenate([array, np.zeros((padding, *array.shape[1:]), array.dtype)])
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA_AXIS))
    return jax.make_array_from_callback(array.shape, rows, lambda index: array[index])


class InMemoryBatches:
    """The train stream of `dataset.in_memory`: the split decoded once and kept on the devices,
    its rows sharded over the mesh (CIFAR-10's 50k images are 150 MB, each of N devices holds
    150/N), every global batch drawn and augmented there by `in_memory_train_batch` from
    (seed, step), so nothing crosses from the host per step and a resumed run draws exactly
    what an uninterrupted one would, on any topology.
    """

    def __init__(self, source, preprocess, *, mesh, batch_size, seed, start_step):
        for op in preprocess.ops:
            if op.device is None:
                raise ValueError(
                    f'dataset.in_memory augments on the device, and augmentation {op.name!r} '
                    'has no device version; use the host pipeline (dataset.in_memory=False)'
                )
        images, labels = load_arrays(source, preprocess.info)
        self._arrays = shard_rows(images, mesh), shard_rows(labels, mesh)
        self._key = jax.random.fold_in(jax.random.PRNGKey(seed), IN_MEMORY_STREAM)
        self._batch = jax.jit(
            functools.partial(
                in_memory_train_batch,
                batch_size=batch_size,
                num_examples=len(labels),
                augmentation=DeviceAugmentation(tuple(preprocess.ops), preprocess.ctx),
            ),
            out_shardings=sharding.batch_sharding(mesh),
        )
        self._step = start_step

    def __iter__(self) -> InMemoryBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        images, labels = self._arrays
        batch = self._batch(images, labels, self._key, self._step)
        self._step += 1
        return batch

    def close(self) -> None:
        pass


IN_MEMORY_STREAM = 7  # the in-memory stream's key: fold_in(PRNGKey(seed), 7)
