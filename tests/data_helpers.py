"""What the input-pipeline tests share: synthetic sources whose images say which example
they are, an ImageNet-like source of varied sizes, and iterators that close their Grain
workers."""

import contextlib

import numpy as np
from synthetic_data import example_indices, synthetic_info

from resnet_jax import (
    datasets,
    preprocessing,
    sources,
)

DATASET = 'cifar10_jpeg'


@contextlib.contextmanager
def iterate(dataset):
    """An iterator that is closed on exit, so Grain's worker processes shut down cleanly."""
    iterator = iter(dataset)
    try:
        yield iterator
    finally:
        close = getattr(iterator, 'close', None)
        if close:
            close()


def take(dataset, n):
    with iterate(dataset) as it:
        return [next(it) for _ in range(n)]


SYNTHETIC_INFO = synthetic_info()


def identity_preprocess(train=False):
    return preprocessing.make_preprocess(
        SYNTHETIC_INFO, train=train, augmentation='none', normalization='none'
    )


def indices(batch, mask=None):
    index = example_indices(batch['image'])
    return list(index if mask is None else index[batch['mask']])


def coordinate_image():
    """A 32x32 image whose pixel (y, x) holds 1 + y and 1 + x: crops reveal their offset."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([1 + y, 1 + x, np.full_like(y, 7)], axis=-1).astype(np.uint8)


def offsets_and_flips(crops):
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


def erased_boxes(images, fill):
    """(top, left, bottom, right) of the pixels equal to `fill` in each image (one box each)."""
    boxes = []
    for image in np.asarray(images):
        rows, cols = np.nonzero(np.all(image == np.asarray(fill), axis=-1))
        boxes.append((rows.min(), cols.min(), rows.max() + 1, cols.max() + 1))
    return np.array(boxes)


IMAGENET_INFO = sources.DatasetInfo(
    'fake_imagenet', 5, None, {'train': 4}, spec=datasets.spec('imagenet2012')
)


def varied_source():
    rng = np.random.default_rng(0)
    shapes = [(300, 400), (500, 333), (256, 256), (180, 240)]
    return [
        {'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'label': i, 'id': str(i)}
        for i, (h, w) in enumerate(shapes)
    ]
