"""Tests of resnet_jax.augment: the paper's CIFAR crops and flips on host and device alike, Cutout,
the scale augmentation of the ImageNet recipe.
"""

import jax
import jax.numpy as jnp
import numpy as np
from data_helpers import coordinate_image, erased_boxes, offsets_and_flips

from resnet_jax import (
    augment,
)


def test_host_cifar_augmentation_stays_within_the_padding_and_flips_half_the_time():
    image = coordinate_image()
    rng = np.random.default_rng(0)
    crops = [augment.pad_crop_flip(image, rng) for _ in range(2000)]
    stats = offsets_and_flips(crops)
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
    image = coordinate_image()
    rng = np.random.default_rng(1)
    host = offsets_and_flips([augment.pad_crop_flip(image, rng) for _ in range(4000)])
    batch = jnp.asarray(np.repeat(image[None], 4000, axis=0))
    device = offsets_and_flips(np.asarray(augment.pad_crop_flip_batch(batch, jax.random.key(1))))
    for column in range(2):  # offsets: both uniform over 0..8
        host_hist = np.bincount(host[:, column], minlength=9) / len(host)
        device_hist = np.bincount(device[:, column], minlength=9) / len(device)
        np.testing.assert_allclose(host_hist, 1 / 9, atol=0.025)
        np.testing.assert_allclose(device_hist, 1 / 9, atol=0.025)
    assert abs(host[:, 2].mean() - device[:, 2].mean()) < 0.05
    assert 0.45 < device[:, 2].mean() < 0.55


def test_cutout_erases_one_clipped_square_on_host_and_device_alike():
    fill = (125, 123, 114)  # CIFAR-10's mean colour: the square normalises to zero
    image = np.full((32, 32, 3), 7, np.uint8)
    rng = np.random.default_rng(0)
    host = erased_boxes([augment.cutout(image, rng, fill=fill) for _ in range(3000)], fill)
    batch = jnp.asarray(np.repeat(image[None], 3000, axis=0))
    device = erased_boxes(augment.cutout_batch(batch, jax.random.key(0), fill=fill), fill)
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


def test_scale_augmentation_uses_the_papers_range():
    image = np.zeros((375, 500, 3), np.uint8)
    for size in (256, 480):
        resized = augment.resize_shorter_side(image, size)
        assert min(resized.shape[:2]) == size
        assert resized.shape[1] == round(500 * size / 375)
    rng = np.random.default_rng(0)
    assert augment.scale_augment(image, rng).shape == (224, 224, 3)
    assert augment.random_resized_crop(image, rng).shape == (224, 224, 3)
