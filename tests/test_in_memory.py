"""`dataset.in_memory`: the train split on the devices, every batch drawn there from (seed,
step): a run that resumes exactly, the host pipeline's distribution, and the cases it refuses."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import DATASET
from synthetic_data import example_indices, synthetic_info, synthetic_source
from test_reliability import _smoke

from resnet_jax import in_memory, preprocessing, sharding, sources, trainer
from resnet_jax.metrics import read_metrics


def _losses(workdir):
    return {
        r['step']: r['train/loss']
        for r in read_metrics(workdir / 'metrics.jsonl')
        if 'train/loss' in r
    }


def test_an_in_memory_run_resumes_exactly_and_learns(cifar10_data_dir, tmp_path):
    straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
    config = lambda **o: _smoke(
        cifar10_data_dir, **{'dataset.in_memory': True, 'log_every_steps': 1, **o}
    )
    trainer.train_and_evaluate(config(), str(straight))
    trainer.train_and_evaluate(config(total_steps=3), str(interrupted))
    trainer.train_and_evaluate(config(), str(interrupted))
    assert _losses(interrupted) == _losses(straight)
    assert sorted(_losses(straight)) == list(range(1, 7))


def test_in_memory_batches_are_sharded_pure_functions_of_the_step(cifar10_data_dir):
    source, info = sources.open_split('cifar10_jpeg', 'train[:64]', str(cifar10_data_dir))
    preprocess = preprocessing.make_preprocess(info, train=True, normalization='channel')
    mesh = sharding.data_mesh()

    def batches(start):
        return in_memory.InMemoryBatches(
            source, preprocess, mesh=mesh, batch_size=16, seed=3, start_step=start
        )

    stream = batches(0)
    taken = [next(stream) for _ in range(3)]
    resumed = next(batches(2))
    chex.assert_trees_all_equal(resumed, taken[2])
    chex.assert_trees_all_equal(next(batches(0)), taken[0])
    assert taken[0]['image'].sharding == sharding.batch_sharding(mesh)
    # uint8 as the host pipeline's batches: the train step normalises them.
    assert taken[0]['image'].shape == (16, 32, 32, 3) and taken[0]['image'].dtype == np.uint8
    # Channel-normalised CIFAR images: about zero mean and unit spread over a batch.
    normalized = jax.jit(preprocess.normalize)(taken[0]['image'])
    assert abs(float(np.mean(normalized))) < 0.5
    assert 0.5 < float(np.std(normalized)) < 1.5
    assert not np.array_equal(taken[0]['label'], taken[1]['label'])


def test_photographs_cannot_be_in_memory(cifar10_data_dir):
    # The folder dataset's crops have no device version, and its images no one shape to stack.
    source, _ = sources.open_split('cifar10_jpeg', 'train[:16]', str(cifar10_data_dir))
    varied = sources.DatasetInfo('folder', 10, None, {'train': 16})
    preprocess = preprocessing.make_preprocess(varied, train=True, normalization='channel')
    with pytest.raises(
        ValueError, match=r"augmentation 'inception_crop_flip' has no device version; use the host"
    ):
        in_memory.InMemoryBatches(
            source,
            preprocess,
            mesh=sharding.data_mesh(),
            batch_size=8,
            seed=0,
            start_step=0,
        )
    with pytest.raises(ValueError, match='varied sizes; the in-memory path needs a fixed shape'):
        in_memory.load_arrays(source, varied)


def _stream(n, *, batch_size=16, seed=3, mesh=None):
    source, info = synthetic_source(n), synthetic_info({'train': n})
    preprocess = preprocessing.make_preprocess(
        info, train=True, augmentation='flip', normalization='none'
    )
    return in_memory.InMemoryBatches(
        source,
        preprocess,
        mesh=mesh or sharding.data_mesh(),
        batch_size=batch_size,
        seed=seed,
        start_step=0,
    )


def test_the_split_is_sharded_over_the_devices_and_draws_what_one_device_draws():
    n = 101  # not a multiple of the 8 devices: padded with rows that are never drawn
    stream = _stream(n)
    images, _ = stream._arrays
    assert images.sharding == sharding.batch_sharding(sharding.data_mesh())
    assert images.shape == (104, 32, 32, 3)  # 13 rows per device, not all 101 on each
    assert {s.data.shape[0] for s in images.addressable_shards} == {13}
    one_device = _stream(n, mesh=sharding.data_mesh(jax.devices()[:1]))
    drawn = []
    for _ in range(12):  # two epochs of 6 batches
        batch, reference = next(stream), next(one_device)
        chex.assert_trees_all_equal(batch, reference)
        drawn.append(example_indices(np.asarray(batch['image'])))
    first, second = np.concatenate(drawn[:6]), np.concatenate(drawn[6:])
    assert len(set(first)) == len(first) == 96 and first.max() < n  # padding never drawn
    assert len(set(second)) == 96 and list(first) != list(second)


def test_only_the_batch_crosses_between_devices():
    """XLA gathers from sharded rows with a masked pick and a collective of the batch; a
    collective of the split (4,096 images, 256 x the batch) would cost more than the step."""
    stream = _stream(4096)
    images, labels = stream._arrays
    hlo = stream._batch.lower(images, labels, stream._key, 0).compile().as_text()
    collectives = re.findall(
        r'= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|reduce-scatter|all-to-all|'
        r'collective-permute)',
        hlo,
    )
    assert collectives  # the gather does communicate
    batch_elements = 16 * 32 * 32 * 3
    for dtype, dims, op in collectives:
        elements = int(np.prod([int(d) for d in dims.split(',') if d]))
        assert elements <= batch_elements, (op, dtype, dims)


def test_in_memory_batches_cover_each_epoch_and_depend_only_on_key_and_step():
    n, batch_size = 64, 16
    images = jnp.asarray(np.stack([r['image'] for r in synthetic_source(n)]))
    labels = jnp.arange(n, dtype=jnp.int32)
    key = jax.random.key(0)

    def batch(step):
        return in_memory.in_memory_train_batch(
            images, labels, key, jnp.int32(step), batch_size=batch_size
        )

    first = batch(0)
    assert first['image'].shape == (16, 32, 32, 3) and first['image'].dtype == jnp.uint8
    epoch0 = np.concatenate([np.asarray(batch(s)['label']) for s in range(4)])
    epoch1 = np.concatenate([np.asarray(batch(s)['label']) for s in range(4, 8)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert list(epoch0) != list(epoch1)
    np.testing.assert_array_equal(batch(5)['image'], batch(5)['image'])
    with pytest.raises(ValueError, match='batch_size 100 exceeds the 64 examples in memory'):
        in_memory.in_memory_train_batch(images, labels, key, 0, batch_size=100)


def test_load_arrays_decodes_the_split(cifar10_data_dir):
    source, info = sources.open_split(DATASET, 'test[:500]', str(cifar10_data_dir))
    images, labels = in_memory.load_arrays(source, info)
    assert images.shape == (500, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[17], source[17]['image'])
    assert labels[17] == source[17]['label']
