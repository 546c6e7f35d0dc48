"""Tests of resnet_jax.sources: TFDS splits (real CIFAR-10), the paper's holdout, a dataset
described as data, and what a missing or damaged dataset says.
"""

import json

import numpy as np
import pytest
from data_helpers import DATASET
from synthetic_data import make_tfds_dataset

from resnet_jax import (
    datasets,
    decode,
    preprocessing,
    sources,
)


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
