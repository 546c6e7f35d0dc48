"""Tests of resnet_jax.preprocessing: record checks, the normalisations (the paper's pixel mean,
kept between runs), the eval crop of photographs, bad options.
"""

import os

import numpy as np
import pytest
from data_helpers import DATASET, IMAGENET_INFO, SYNTHETIC_INFO, identity_preprocess, varied_source
from synthetic_data import make_tfds_dataset, synthetic_source

from resnet_jax import (
    augment,
    paths,
    pipelines,
    preprocessing,
    sources,
)


def test_pixel_mean_is_the_train_mean_image(cifar):
    _, _, data_dir = cifar
    mean = preprocessing.pixel_mean(DATASET, data_dir)
    assert mean.shape == (32, 32, 3)
    # The shared copy's channel means (its README): 0.4913, 0.4821, 0.4465 of 255.
    np.testing.assert_allclose(mean.mean(axis=(0, 1)) / 255, [0.4913, 0.4821, 0.4465], atol=5e-4)


def test_imagenet_eval_resizes_to_256_and_center_crops_224():
    preprocess = preprocessing.make_preprocess(
        IMAGENET_INFO, train=False, normalization='pixel_mean'
    )
    batches = list(pipelines.eval_dataset(varied_source(), preprocess, batch_size=3))
    assert [int(b['mask'].sum()) for b in batches] == [3, 1]
    assert batches[0]['image'].shape == (3, 224, 224, 3)
    image = np.zeros((300, 600, 3), np.uint8)
    image[:, 300:] = 255  # right half white: the centre crop straddles the edge evenly
    crop = augment.resize_center_crop(image)
    assert crop.shape == (224, 224, 3)
    assert abs(crop[..., 0].mean() - 127.5) < 3


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
        identity_preprocess()(record)


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
            identity_preprocess(),
            batch_size=4,
            seed=0,
            reading=pipelines.Reading(num_workers=-1),
        )


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
