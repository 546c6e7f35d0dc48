"""Tests of resnet_jax.data, augment and sharding.global_batch, on the real CIFAR-10.

Index-tracking tests use small synthetic sources whose images encode their index, so that
shards, epochs and eval coverage can be checked example by example.
"""

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from synthetic_data import example_indices, make_tfds_dataset, synthetic_info, synthetic_source

from resnet_jax import (
    augment,
    datasets,
    decode,
    in_memory,
    paths,
    pipelines,
    preprocessing,
    sharding,
    sources,
)

DATASET = 'cifar10_jpeg'


@pytest.fixture(scope='module')
def cifar(cifar10_data_dir):
    source, info = sources.open_split(DATASET, 'train', str(cifar10_data_dir))
    return source, info, str(cifar10_data_dir)


@contextlib.contextmanager
def _iterate(dataset):
    """An iterator that is closed on exit, so Grain's worker processes shut down cleanly."""
    iterator = iter(dataset)
    try:
        yield iterator
    finally:
        close = getattr(iterator, 'close', None)
        if close:
            close()


def _take(dataset, n):
    with _iterate(dataset) as it:
        return [next(it) for _ in range(n)]


# --- Synthetic sources whose images say which example they are ------------------------------

SYNTHETIC_INFO = synthetic_info()


def _identity(train=False):
    return preprocessing.make_preprocess(
        SYNTHETIC_INFO, train=train, augmentation='none', normalization='none'
    )


def _indices(batch, mask=None):
    index = example_indices(batch['image'])
    return list(index if mask is None else index[batch['mask']])


# --- Sources and splits ----------------------------------------------------------------------


def test_open_split_reads_real_cifar10(cifar):
    source, info, _ = cifar
    assert info == sources.DatasetInfo(DATASET, 10, (32, 32, 3), {'train': 50000, 'test': 10000})
    assert info.family == 'cifar'
    assert len(source) == 50000
    record = source[123]
    assert record['image'].shape == (32, 32, 3) and record['image'].dtype == np.uint8


def test_tfds_split_strings_work(cifar10_data_dir):
    source, _ = sources.open_split(DATASET, 'test[:1003]', str(cifar10_data_dir))
    assert len(source) == 1003
    source, _ = sources.open_split(DATASET, 'train[:10]+test[:5]', str(cifar10_data_dir))
    assert len(source) == 15


def test_holdout_split_is_disjoint_stable_and_sized(cifar10_data_dir):
    train, val = sources.holdout_indices(50000)
    assert len(train) == 45000 and len(val) == 5000
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(50000))
    np.random.seed(123)  # the global numpy seed must not matter
    _, again_val = sources.holdout_indices(50000)
    np.testing.assert_array_equal(again_val, val)
    # Pinned: changing the holdout silently would invalidate every model selection made on it.
    assert list(val[:5]) == [11, 21, 45, 74, 81]
    d = str(cifar10_data_dir)
    train_source, _ = sources.open_split(DATASET, 'train_45k', d)
    val_source, _ = sources.open_split(DATASET, 'val_5k', d)
    assert (len(train_source), len(val_source)) == (45000, 5000)
    val_ids = {val_source[i]['id'] for i in range(0, 5000, 50)}
    train_ids = {train_source[i]['id'] for i in range(0, 45000, 50)}
    assert not val_ids & train_ids
    # The validation set is not one class: the train split is stored grouped by class.
    assert len({val_source[i]['label'] for i in range(0, 5000, 50)}) == 10


# --- Train pipeline --------------------------------------------------------------------------


def test_train_batches_have_the_right_shapes_and_dtypes(cifar):
    source, info, data_dir = cifar
    for normalization in ('pixel_mean', 'channel'):
        preprocess = preprocessing.make_preprocess(
            info, train=True, data_dir=data_dir, normalization=normalization
        )
        (batch,) = _take(pipelines.train_dataset(source, preprocess, batch_size=16, seed=0), 1)
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


def test_pixel_mean_is_the_train_mean_image(cifar):
    _, _, data_dir = cifar
    mean = preprocessing.pixel_mean(DATASET, data_dir)
    assert mean.shape == (32, 32, 3)
    # The shared copy's channel means (its README): 0.4913, 0.4821, 0.4465 of 255.
    np.testing.assert_allclose(mean.mean(axis=(0, 1)) / 255, [0.4913, 0.4821, 0.4465], atol=5e-4)


def test_worker_and_thread_counts_do_not_change_the_batches(cifar):
    source, info, data_dir = cifar
    preprocess = preprocessing.make_preprocess(info, train=True, data_dir=data_dir)
    in_process = _take(pipelines.train_dataset(source, preprocess, batch_size=8, seed=3), 3)
    for options in ({'num_workers': 2, 'read_threads': 2}, {'read_threads': 3}):
        parallel = _take(
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
    jax.tree.map(np.testing.assert_array_equal, serial, threaded)


def test_records_come_decoded_and_the_pipeline_reads_them_encoded(cifar):
    """TFDS images are read undecoded: records decode them with OpenCV (the pixels TFDS's
    own decoder gives), the pipeline's read keeps them encoded for the crops to decode."""
    import tensorflow_datasets as tfds

    source, _, data_dir = cifar
    reference = tfds.data_source(DATASET, split='train', data_dir=data_dir)
    for i in (0, 17, 4242):
        np.testing.assert_array_equal(source[i]['image'], reference[i]['image'])
    (record,) = sources.read_encoded(source, [17])
    assert isinstance(record['image'], decode.EncodedImage)
    assert record['image'].shape == (32, 32, 3)
    np.testing.assert_array_equal(record['image'].decode(), reference[17]['image'])
    assert 'record 17 of split' in record['image'].where


def test_iterator_state_resumes_at_the_next_batch(cifar):
    source, info, data_dir = cifar
    preprocess = preprocessing.make_preprocess(info, train=True, data_dir=data_dir)
    dataset = pipelines.train_dataset(source, preprocess, batch_size=8, seed=5)
    with _iterate(dataset) as it:
        for _ in range(3):
            next(it)
        state = it.get_state()
        expected = next(it)
    with _iterate(dataset) as resumed:
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
            _identity(),
            batch_size=8,
            seed=0,
            reading=pipelines.Reading(process_index=process, process_count=2),
        )
        indices = [i for batch in _take(dataset, 4) for i in _indices(batch)]  # one epoch
        assert len(set(indices)) == 32
        seen.append(set(indices))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(64))


def test_global_batches_and_their_augmentation_do_not_depend_on_the_topology():
    source = synthetic_source(64)
    preprocess = preprocessing.make_preprocess(SYNTHETIC_INFO, train=True, normalization='none')
    one = _take(pipelines.train_dataset(source, preprocess, batch_size=16, seed=3), 6)  # 1.5 epochs
    for count in (2, 4):
        slices = [
            _take(
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
    batches = _take(pipelines.train_dataset(source, _identity(), batch_size=8, seed=0), 8)
    epoch0 = [i for b in batches[:4] for i in _indices(b)]
    epoch1 = [i for b in batches[4:] for i in _indices(b)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(32))
    assert epoch0 != epoch1
    again = _take(pipelines.train_dataset(source, _identity(), batch_size=8, seed=0), 4)
    assert [i for b in again for i in _indices(b)] == epoch0
    other = _take(pipelines.train_dataset(source, _identity(), batch_size=8, seed=1), 4)
    assert [i for b in other for i in _indices(b)] != epoch0


# --- Exact eval ------------------------------------------------------------------------------


@pytest.mark.parametrize('processes,batch_size', [(1, 64), (2, 64), (3, 7)])
def test_eval_visits_every_example_exactly_once(processes, batch_size):
    source = synthetic_source(203)
    seen = []
    num_batches = set()
    for process in range(processes):
        dataset = pipelines.eval_dataset(
            source,
            _identity(),
            batch_size=batch_size,
            reading=pipelines.Reading(process_index=process, process_count=processes),
        )
        batches = list(dataset)
        num_batches.add(len(batches))
        for batch in batches:
            assert batch['image'].shape[0] == batch_size
            seen += _indices(batch, batch['mask'])
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


# --- Augmentation ----------------------------------------------------------------------------


def _coordinate_image():
    """A 32x32 image whose pixel (y, x) holds 1 + y and 1 + x: crops reveal their offset."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([1 + y, 1 + x, np.full_like(y, 7)], axis=-1).astype(np.uint8)


def _offsets_and_flips(crops):
    """(top, left, flipped) of each crop of the 4-pixel-padded coordinate image."""
    out = []
    for crop in crops:
        real = crop[:, :, 2] > 0
        r, c = np.argwhere(real)[0]  # the first real (not padding) pixel
        columns = np.nonzero(real[r])[0]
        flipped = crop[r, columns[0], 1] > crop[r, columns[-1], 1]
        top = int(crop[r, c, 0]) - 1 - int(r) + 4
        left = int(crop[r, c, 1]) - 1 - (31 - int(c) if flipped else int(c)) + 4
        out.append((top, left, flipped))
    return np.array(out)


def test_host_cifar_augmentation_stays_within_the_padding_and_flips_half_the_time():
    image = _coordinate_image()
    rng = np.random.default_rng(0)
    crops = [augment.pad_crop_flip(image, rng) for _ in range(2000)]
    stats = _offsets_and_flips(crops)
    assert stats[:, 0].min() == 0 and stats[:, 0].max() == 8
    assert stats[:, 1].min() == 0 and stats[:, 1].max() == 8
    assert 0.45 < stats[:, 2].mean() < 0.55
    # Pixels from outside the image are zeros.
    for crop, (top, left, _) in zip(crops[:50], stats[:50], strict=True):
        assert crop.shape == (32, 32, 3)
        assert np.count_nonzero(crop[:, :, 2] == 0) == 32 * 32 - (32 - abs(top - 4)) * (
            32 - abs(left - 4)
        )


def test_device_cifar_augmentation_matches_the_host_statistics():
    image = _coordinate_image()
    rng = np.random.default_rng(1)
    host = _offsets_and_flips([augment.pad_crop_flip(image, rng) for _ in range(4000)])
    batch = jnp.asarray(np.repeat(image[None], 4000, axis=0))
    device = _offsets_and_flips(np.asarray(augment.pad_crop_flip_batch(batch, jax.random.key(1))))
    for column in range(2):  # offsets: both uniform over 0..8
        host_hist = np.bincount(host[:, column], minlength=9) / len(host)
        device_hist = np.bincount(device[:, column], minlength=9) / len(device)
        np.testing.assert_allclose(host_hist, 1 / 9, atol=0.025)
        np.testing.assert_allclose(device_hist, 1 / 9, atol=0.025)
    assert abs(host[:, 2].mean() - device[:, 2].mean()) < 0.05
    assert 0.45 < device[:, 2].mean() < 0.55


def _erased_boxes(images, fill):
    """(top, left, bottom, right) of the pixels equal to `fill` in each image (one box each)."""
    boxes = []
    for image in np.asarray(images):
        rows, cols = np.nonzero(np.all(image == np.asarray(fill), axis=-1))
        boxes.append((rows.min(), cols.min(), rows.max() + 1, cols.max() + 1))
    return np.array(boxes)


def test_cutout_erases_one_clipped_square_on_host_and_device_alike():
    fill = (125, 123, 114)  # CIFAR-10's mean colour: the square normalises to zero
    image = np.full((32, 32, 3), 7, np.uint8)
    rng = np.random.default_rng(0)
    host = _erased_boxes([augment.cutout(image, rng, fill=fill) for _ in range(3000)], fill)
    batch = jnp.asarray(np.repeat(image[None], 3000, axis=0))
    device = _erased_boxes(augment.cutout_batch(batch, jax.random.key(0), fill=fill), fill)
    for boxes in (host, device):
        heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert heights.max() == widths.max() == 16  # never larger; clipped at the border
        assert heights.min() == widths.min() == 8  # a centre on the edge keeps half
        # Centres uniform over the image: a box touches the top edge 9/32 of the time.
        assert 0.24 < np.mean(boxes[:, 0] == 0) < 0.33
    assert abs(np.mean(host[:, 2] - host[:, 0]) - np.mean(device[:, 2] - device[:, 0])) < 0.3
    # Everything else is untouched, and the chain runs it after the crop.
    erased = augment.cutout(image, np.random.default_rng(1), fill=fill)
    assert (
        np.count_nonzero(np.all(erased == 7, axis=-1))
        + np.count_nonzero(np.all(erased == np.asarray(fill), axis=-1))
        == 32 * 32
    )
    ops = augment.parse_chain('pad_crop_flip+cutout')
    assert [op.name for op in ops] == ['pad_crop_flip', 'cutout']


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


# --- ImageNet-style images of varied sizes ---------------------------------------------------

IMAGENET_INFO = sources.DatasetInfo(
    'fake_imagenet', 5, None, {'train': 4}, spec=datasets.spec('imagenet2012')
)


def _varied_source():
    rng = np.random.default_rng(0)
    shapes = [(300, 400), (500, 333), (256, 256), (180, 240)]
    return [
        {'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'label': i, 'id': str(i)}
        for i, (h, w) in enumerate(shapes)
    ]


@pytest.mark.parametrize('augmentation', ['default', 'inception_crop_flip'])
def test_imagenet_train_batches_from_varied_sizes(augmentation):
    preprocess = preprocessing.make_preprocess(
        IMAGENET_INFO, train=True, augmentation=augmentation, normalization='channel'
    )
    (batch,) = _take(pipelines.train_dataset(_varied_source(), preprocess, batch_size=4, seed=0), 1)
    assert batch['image'].shape == (4, 224, 224, 3) and batch['image'].dtype == np.uint8
    assert sorted(batch['label']) == [0, 1, 2, 3]
    assert -3 < preprocess.normalize(batch['image']).mean() < 3  # (x - mean) / std


def test_imagenet_eval_resizes_to_256_and_center_crops_224():
    preprocess = preprocessing.make_preprocess(
        IMAGENET_INFO, train=False, normalization='pixel_mean'
    )
    batches = list(pipelines.eval_dataset(_varied_source(), preprocess, batch_size=3))
    assert [int(b['mask'].sum()) for b in batches] == [3, 1]
    assert batches[0]['image'].shape == (3, 224, 224, 3)
    image = np.zeros((300, 600, 3), np.uint8)
    image[:, 300:] = 255  # right half white: the centre crop straddles the edge evenly
    crop = augment.resize_center_crop(image)
    assert crop.shape == (224, 224, 3)
    assert abs(crop[..., 0].mean() - 127.5) < 3


def test_scale_augmentation_uses_the_papers_range():
    image = np.zeros((375, 500, 3), np.uint8)
    for size in (256, 480):
        resized = augment.resize_shorter_side(image, size)
        assert min(resized.shape[:2]) == size
        assert resized.shape[1] == round(500 * size / 375)
    rng = np.random.default_rng(0)
    assert augment.scale_augment(image, rng).shape == (224, 224, 3)
    assert augment.random_resized_crop(image, rng).shape == (224, 224, 3)


# --- Placement -------------------------------------------------------------------------------


def test_global_batch_is_sharded_over_the_data_axis():
    mesh = sharding.data_mesh()
    local = {'image': np.arange(16 * 2, dtype=np.float32).reshape(16, 2), 'label': np.arange(16)}
    batch = sharding.global_batch(local, mesh)
    assert batch['image'].shape == (16, 2)
    assert len(batch['image'].addressable_shards) == 8
    assert batch['image'].addressable_shards[1].data.shape == (2, 2)
    np.testing.assert_array_equal(batch['label'], local['label'])
    assert sharding.local_batch_size(16, mesh) == 16


# --- Bad input -------------------------------------------------------------------------------


def test_an_unknown_dataset_lists_the_registered_ones(tmp_path):
    (tmp_path / 'cifar11').mkdir()  # prepared or not: a dataset must be described to be used
    with pytest.raises(
        ValueError, match=r"unknown dataset 'cifar11': expected one of cifar10, cifar10_jpeg"
    ):
        sources.open_split('cifar11', 'train', str(tmp_path))
    with pytest.raises(ValueError, match='dataset name must be a TFDS name'):
        sources.open_split('../etc', 'train', str(tmp_path))


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'imagenet2012'])
def test_missing_registered_dataset_says_how_to_prepare_it(tmp_path, name):
    message = rf'{name}.* is not prepared in .*tfds build {name} --file_format=array_record'
    with pytest.raises(ValueError, match=message) as info:
        sources.open_split(name, 'train', str(tmp_path))
    if name == 'imagenet2012':
        assert 'downloads/manual' in str(info.value)


def test_download_failure_is_one_clear_error(tmp_path):
    # No internet (and no TensorFlow) here: preparing must fail fast with the manual command.
    with pytest.raises(ValueError, match=r"could not prepare dataset 'cifar100' .*tfds build"):
        sources.open_split('cifar100', 'train', str(tmp_path), download=True)


def test_damaged_dataset_directory(tmp_path):
    (tmp_path / 'cifar10' / '3.0.2').mkdir(parents=True)
    with pytest.raises(ValueError, match=r"'cifar10' in .* has no prepared splits .*tfds build"):
        sources.open_split('cifar10', 'train', str(tmp_path))


def test_missing_split_lists_the_valid_ones(cifar10_data_dir):
    with pytest.raises(
        ValueError,
        match=r"no split 'validation' .*expected one of train, test, train_45k, val_5k",
    ):
        sources.open_split(DATASET, 'validation', str(cifar10_data_dir))
    with pytest.raises(ValueError, match=r"no split 'tset'"):
        sources.open_split(DATASET, 'train+tset[:5]', str(cifar10_data_dir))


def test_bad_data_dir(tmp_path):
    with pytest.raises(ValueError, match=r"data_dir '.*nowhere' does not exist"):
        sources.open_split(DATASET, 'train', str(tmp_path / 'nowhere'))
    not_a_dir = tmp_path / 'file'
    not_a_dir.write_text('')
    with pytest.raises(ValueError, match=r"data_dir '.*file' is not a directory"):
        sources.open_split(DATASET, 'train', str(not_a_dir))


def test_batch_size_must_divide_over_devices_and_processes():
    mesh = sharding.data_mesh()
    with pytest.raises(ValueError, match='batch_size 12 is not divisible by the 8 devices'):
        sharding.local_batch_size(12, mesh)
    with pytest.raises(ValueError, match='batch_size 0 is not a positive int'):
        sharding.local_batch_size(0, mesh)
    with pytest.raises(ValueError, match='batch_size 0 is not a positive int'):
        pipelines.train_dataset(synthetic_source(8), _identity(), batch_size=0, seed=0)
    with pytest.raises(ValueError, match=r'global batch of 16 \(1 processes x 16\) exceeds the 8'):
        pipelines.train_dataset(synthetic_source(8), _identity(), batch_size=16, seed=0)
    with pytest.raises(ValueError, match=r'process_index 2 is outside \[0, 2\)'):
        pipelines.eval_dataset(
            synthetic_source(8),
            _identity(),
            batch_size=4,
            reading=pipelines.Reading(process_index=2, process_count=2),
        )


@pytest.mark.parametrize(
    'image,label,message',
    [
        (np.zeros((32, 32, 1), np.uint8), 0, r'image has shape \(32, 32, 1\) and dtype uint8'),
        (np.zeros((32, 32, 3), np.float32), 0, r'image has shape \(32, 32, 3\) and dtype float32'),
        (np.zeros((28, 28, 3), np.uint8), 0, r'image has shape \(28, 28, 3\), expected \(32, 32'),
        (np.zeros((32, 32, 3), np.uint8), 10, r'label 10 is outside \[0, 10\)'),
        (np.zeros((32, 32, 3), np.uint8), -1, r'label -1 is outside \[0, 10\)'),
    ],
)
def test_malformed_records_are_named(image, label, message):
    record = {'image': image, 'label': label, 'id': 'bad7'}
    with pytest.raises(ValueError, match=rf"record 'bad7' of synthetic: {message}"):
        _identity()(record)


def test_bad_options():
    with pytest.raises(
        ValueError, match=r"unknown augmentation 'autoaugment' in 'flip\+autoaugment'"
    ):
        preprocessing.make_preprocess(IMAGENET_INFO, train=True, augmentation='flip+autoaugment')
    with pytest.raises(ValueError, match=r"normalization 'zca' is invalid; expected one of pixel"):
        preprocessing.make_preprocess(IMAGENET_INFO, train=True, normalization='zca')
    with pytest.raises(
        ValueError, match="'inception_crop_flip' is for imagenet datasets; synthetic is a cifar"
    ):
        preprocessing.make_preprocess(
            SYNTHETIC_INFO, train=True, augmentation='inception_crop_flip', normalization='channel'
        )
    with pytest.raises(ValueError, match='num_workers must be an int >= 0'):
        pipelines.train_dataset(
            synthetic_source(8),
            _identity(),
            batch_size=4,
            seed=0,
            reading=pipelines.Reading(num_workers=-1),
        )


# --- A dataset described as data: docs/extending.md's example ---------------------------------


@pytest.mark.slow
def test_a_dataset_described_as_data_trains_end_to_end(tmp_path):
    from configs import smoke
    from resnet_jax import config as config_lib
    from resnet_jax import trainer

    written = make_tfds_dataset(tmp_path / 'tfds', 'svhn_cropped', {'train': 64, 'test': 32})
    source, info = sources.open_split('svhn_cropped', 'train', str(tmp_path / 'tfds'))
    assert (len(source), info.num_classes, info.image_shape) == (64, 10, (32, 32, 3))
    np.testing.assert_array_equal(source[5]['image'], written['train']['image'][5])
    assert info.family == 'cifar' and info.spec.mean == datasets.SVHN_MEAN
    # Its default augmentation is the spec's: crops, never a flip.
    preprocess = preprocessing.make_preprocess(info, train=True, normalization='channel')
    assert [op.name for op in preprocess.ops] == ['pad_crop']

    config = smoke.get_config()
    config_lib.apply_overrides(
        config,
        {
            'dataset.name': 'svhn_cropped',
            'dataset.data_dir': str(tmp_path / 'tfds'),
            'dataset.train_split': 'train',
            'dataset.eval_split': 'test',
            'dataset.normalization': 'channel',
            'total_steps': 2,
            'eval_every_steps': 2,
        },
    )
    final = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert final['eval/num_examples'] == 32
    recorded = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert recorded['dataset']['name'] == 'svhn_cropped'


def test_the_pixel_mean_is_kept_between_runs_and_measured_again_for_new_files(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / 'cache'))
    written = make_tfds_dataset(tmp_path / 'tfds', 'svhn_cropped', {'train': 40, 'test': 8})
    data_dir = str(tmp_path / 'tfds')
    mean = preprocessing.pixel_mean('svhn_cropped', data_dir)
    np.testing.assert_allclose(mean, written['train']['image'].mean(axis=0), rtol=1e-6)
    (cached,) = (tmp_path / 'cache' / 'pixel_mean').iterdir()
    np.save(cached, np.full_like(mean, 7.0))  # what a later run finds is what it uses
    preprocessing.pixel_mean.cache_clear()
    np.testing.assert_array_equal(preprocessing.pixel_mean('svhn_cropped', data_dir), 7.0)
    (train_file,) = sources.dataset_info('svhn_cropped', data_dir).files['train']
    os.utime(train_file)  # prepared again: a new file, measured again
    preprocessing.pixel_mean.cache_clear()
    np.testing.assert_allclose(preprocessing.pixel_mean('svhn_cropped', data_dir), mean, rtol=1e-6)
    assert len(list((tmp_path / 'cache' / 'pixel_mean').iterdir())) == 2
