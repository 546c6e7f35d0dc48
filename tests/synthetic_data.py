"""Synthetic records whose images say which example they are, for index-tracking tests."""

import numpy as np


def synthetic_source(n: int) -> list[dict]:
    """n records of 32x32x3 uint8 images; pixel channels 0/1 hold the index (low/high byte)."""
    records = []
    for i in range(n):
        image = np.zeros((32, 32, 3), np.uint8)
        image[..., 0], image[..., 1] = i % 256, i // 256
        records.append({'image': image, 'label': i % 10, 'id': f'ex{i}'})
    return records


def example_indices(images: np.ndarray) -> np.ndarray:
    """The index each (possibly normalised, never augmented) image of a batch encodes."""
    return images[:, 5, 5, 0].astype(np.int32) + 256 * images[:, 5, 5, 1].astype(np.int32)
