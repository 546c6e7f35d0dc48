"""Tests of resnet_jax.pipelines: batches of each process's slice of the global batch, the same on
any topology, workers and threads; exact padded evaluation.
"""

import chex
import jax
import numpy as np
import pytest
from data_helpers import (
    DATASET,
    IMAGENET_INFO,
    SYNTHETIC_INFO,
    identity_preprocess,
    indices,
    iterate,
    take,
    varied_source,
)
from synthetic_data import synthetic_source

from resnet_jax import (
    pipelines,
    preprocessing,
    sharding,
    sources,
)


def test_train_batches_have_the_right_shapes_and_dtypes(cifar):
    source, info, data_dir = cifar
    for normalization in ('pixel_mean', 'channel'):
        preprocess = preprocessing.make_preprocess(
            info, train=True, data_dir=data_dir, normalization=normalization
        )
        (batch,) = take(pipelines.train_dataset(source, preprocess, batch_size=16, seed=0), 1)
        # uint8 pixels leave the host; the normalisation runs on the device, in the step.
        assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.uint8
        assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
        assert np.all((batch['label'] >= 0) & (batch['label'] < 10))
        normalized = np.asarray(jax.jit(preprocess.normalize)(batch['image']))
        assert normalized.dtype == np.float32
        np.testing.assert_allclose(
            normalized, preprocess.normalize(batch['image']), rtol=1e-6, atol=1e-4
        )
        assert abs(float(normalized.mean())) < 40  # centred


def test_worker_and_thread_counts_do_not_change_the_batches(cifar):
    source, info, data_dir = cifar
    preprocess = preprocessing.make_preprocess(info, train=True, data_dir=data_dir)
    in_process = take(pipelines.train_dataset(source, preprocess, batch_size=8, seed=3), 3)
    for options in ({'num_workers': 2, 'read_threads': 2}, {'read_threads': 3}):
        parallel = take(
            pipelines.train_dataset(
                source, preprocess, batch_size=8, seed=3, reading=pipelines.Reading(**options)
            ),
            3,
        )
        for a, b in zip(in_process, parallel, strict=True):
            np.testing.assert_array_equal(a['image'], b['image'])
            np.testing.assert_array_equal(a['label'], b['label'])
    eval_preprocess = preprocessing.make_preprocess(info, train=False, data_dir=data_dir)
    serial = list(pipelines.eval_dataset(source, eval_preprocess, batch_size=8))[:3]
    threaded = list(
        pipelines.eval_dataset(
            source, eval_preprocess, batch_size=8, reading=pipelines.Reading(read_threads=3)
        )
    )[:3]
    chex.assert_trees_all_equal(serial, threaded)


def test_iterator_state_resumes_at_the_next_batch(cifar):
    source, info, data_dir = cifar
    preprocess = preprocessing.make_preprocess(info, train=True, data_dir=data_dir)
    dataset = pipelines.train_dataset(source, preprocess, batch_size=8, seed=5)
    with iterate(dataset) as it:
        for _ in range(3):
            next(it)
        state = it.get_state()
        expected = next(it)
    with iterate(dataset) as resumed:
        resumed.set_state(state)
        got = next(resumed)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['label'], expected['label'])


def test_process_shards_are_disjoint_and_cover_the_split():
    source = synthetic_source(64)
    seen = []
    for process in range(2):
        dataset = pipelines.train_dataset(
            source,
            identity_preprocess(),
            batch_size=8,
            seed=0,
            reading=pipelines.Reading(process_index=process, process_count=2),
        )
        visited = [i for batch in take(dataset, 4) for i in indices(batch)]  # one epoch
        assert len(set(visited)) == 32
        seen.append(set(visited))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(64))


def test_global_batches_and_their_augmentation_do_not_depend_on_the_topology():
    source = synthetic_source(64)
    preprocess = preprocessing.make_preprocess(SYNTHETIC_INFO, train=True, normalization='none')
    one = take(pipelines.train_dataset(source, preprocess, batch_size=16, seed=3), 6)  # 1.5 epochs
    for count in (2, 4):
        slices = [
            take(
                pipelines.train_dataset(
                    source,
                    preprocess,
                    batch_size=16 // count,
                    seed=3,
                    reading=pipelines.Reading(process_index=i, process_count=count),
                ),
                6,
            )
            for i in range(count)
        ]
        for step, whole in enumerate(one):
            for key in ('image', 'label'):
                joined = np.concatenate([s[step][key] for s in slices])
                np.testing.assert_array_equal(joined, whole[key])  # augmentation included


def test_epochs_reshuffle_and_the_seed_decides_the_order():
    source = synthetic_source(32)
    batches = take(pipelines.train_dataset(source, identity_preprocess(), batch_size=8, seed=0), 8)
    epoch0 = [i for b in batches[:4] for i in indices(b)]
    epoch1 = [i for b in batches[4:] for i in indices(b)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(32))
    assert epoch0 != epoch1
    again = take(pipelines.train_dataset(source, identity_preprocess(), batch_size=8, seed=0), 4)
    assert [i for b in again for i in indices(b)] == epoch0
    other = take(pipelines.train_dataset(source, identity_preprocess(), batch_size=8, seed=1), 4)
    assert [i for b in other for i in indices(b)] != epoch0


@pytest.mark.parametrize('processes,batch_size', [(1, 64), (2, 64), (3, 7)])
def test_eval_visits_every_example_exactly_once(processes, batch_size):
    source = synthetic_source(203)
    seen = []
    num_batches = set()
    for process in range(processes):
        dataset = pipelines.eval_dataset(
            source,
            identity_preprocess(),
            batch_size=batch_size,
            reading=pipelines.Reading(process_index=process, process_count=processes),
        )
        batches = list(dataset)
        num_batches.add(len(batches))
        for batch in batches:
            assert batch['image'].shape[0] == batch_size
            seen += indices(batch, batch['mask'])
    assert len(num_batches) == 1  # every process runs the same number of (collective) steps
    assert sorted(seen) == list(range(203))


def test_eval_on_real_cifar10_counts_the_whole_split(cifar10_data_dir):
    d = str(cifar10_data_dir)
    source, info = sources.open_split(DATASET, 'test[:1003]', d)
    preprocess = preprocessing.make_preprocess(info, train=False, data_dir=d)
    total = 0
    labels = np.zeros(10, int)
    for batch in pipelines.eval_dataset(source, preprocess, batch_size=100):
        total += int(batch['mask'].sum())
        np.add.at(labels, batch['label'][batch['mask']], 1)
        # Eval images are the unmodified pixels minus the mean image.
        assert batch['image'].shape == (100, 32, 32, 3)
    assert total == 1003
    assert labels.sum() == 1003
    expected = np.bincount([source[i]['label'] for i in range(1003)], minlength=10)
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize('augmentation', ['default', 'inception_crop_flip'])
def test_imagenet_train_batches_from_varied_sizes(augmentation):
    preprocess = preprocessing.make_preprocess(
        IMAGENET_INFO, train=True, augmentation=augmentation, normalization='channel'
    )
    (batch,) = take(pipelines.train_dataset(varied_source(), preprocess, batch_size=4, seed=0), 1)
    assert batch['image'].shape == (4, 224, 224, 3) and batch['image'].dtype == np.uint8
    assert sorted(batch['label']) == [0, 1, 2, 3]
    assert -3 < preprocess.normalize(batch['image']).mean() < 3  # (x - mean) / std


def test_batch_size_must_divide_over_devices_and_processes():
    mesh = sharding.data_mesh()
    with pytest.raises(ValueError, match='batch_size 12 is not divisible by the 8 devices'):
        sharding.local_batch_size(12, mesh)
    with pytest.raises(ValueError, match='batch_size 0 is not a positive int'):
        sharding.local_batch_size(0, mesh)
    with pytest.raises(ValueError, match='batch_size 0 is not a positive int'):
        pipelines.train_dataset(synthetic_source(8), identity_preprocess(), batch_size=0, seed=0)
    with pytest.raises(ValueError, match=r'global batch of 16 \(1 processes x 16\) exceeds the 8'):
        pipelines.train_dataset(synthetic_source(8), identity_preprocess(), batch_size=16, seed=0)
    with pytest.raises(ValueError, match=r'process_index 2 is outside \[0, 2\)'):
        pipelines.eval_dataset(
            synthetic_source(8),
            identity_preprocess(),
            batch_size=4,
            reading=pipelines.Reading(process_index=2, process_count=2),
        )
