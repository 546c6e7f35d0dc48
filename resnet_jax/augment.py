"""Image augmentation and normalisation: the paper's, and the modern alternatives.

Host versions work on one uint8 HWC numpy image with a `numpy.random.Generator` (Grain's
`random_map` hands each example its own generator, seeded by (seed, index), so results do not
depend on the number of worker processes). The device version of the CIFAR augmentation works
on a uint8 NHWC batch inside `jit` from a `jax.random` key, for the in-memory fast path; both
draw crop offsets uniformly in [0, 2 * pad] and flip with probability 1/2.

* CIFAR (paper section 4.2): pad 4 pixels with zeros, random 32x32 crop, horizontal flip.
* ImageNet (paper section 3.4): shorter side resized to a random size in [256, 480], random
  224x224 crop, horizontal flip; or Inception-style random-resized crop (option).
  Eval: shorter side resized to 256, centre 224x224 crop.
"""

from __future__ import annotations

import math

import cv2
import jax
import jax.numpy as jnp
import numpy as np

# Channel statistics on the 0..255 scale.
CIFAR10_MEAN = (125.31, 122.95, 113.87)  # 0.4914, 0.4822, 0.4465
CIFAR10_STD = (62.99, 62.09, 66.70)  # 0.2470, 0.2435, 0.2616
CIFAR100_MEAN = (129.30, 124.07, 112.43)  # 0.5071, 0.4865, 0.4409
CIFAR100_STD = (68.17, 65.39, 70.42)  # 0.2673, 0.2564, 0.2762
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0.485, 0.456, 0.406
IMAGENET_STD = (58.395, 57.12, 57.375)  # 0.229, 0.224, 0.225

CIFAR_PAD = 4
IMAGENET_CROP = 224
IMAGENET_EVAL_RESIZE = 256
IMAGENET_SCALE_RANGE = (256, 480)  # the paper's shorter-side range
INCEPTION_AREA_RANGE = (0.08, 1.0)
INCEPTION_RATIO_RANGE = (3 / 4, 4 / 3)


# --- Host (numpy) ----------------------------------------------------------------------------


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = CIFAR_PAD) -> np.ndarray:
    """The paper's CIFAR augmentation: zero-pad, random crop of the original size, flip."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    crop = padded[top : top + h, left : left + w]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    # Area averaging when shrinking avoids aliasing; bilinear when enlarging.
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def scale_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[int, int] = IMAGENET_SCALE_RANGE,
    crop: int = IMAGENET_CROP,
) -> np.ndarray:
    """The paper's ImageNet augmentation: random shorter side, random crop, flip."""
    image = resize_shorter_side(image, int(rng.integers(scale_range[0], scale_range[1] + 1)))
    h, w = image.shape[:2]
    top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    image = image[top : top + crop, left : left + crop]
    return image[:, ::-1] if rng.random() < 0.5 else image


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int = IMAGENET_CROP,
    area_range: tuple[float, float] = INCEPTION_AREA_RANGE,
    ratio_range: tuple[float, float] = INCEPTION_RATIO_RANGE,
    attempts: int = 10,
) -> np.ndarray:
    """Inception-style crop (Szegedy et al. 2015) resized to size x size, then flip.

    Falls back to the central crop of the whole image, as torchvision does, when no sampled
    box fits in `attempts` tries.
    """
    h, w = image.shape[:2]
    log_ratio = (math.log(ratio_range[0]), math.log(ratio_range[1]))
    for _ in range(attempts):
        area = h * w * rng.uniform(*area_range)
        ratio = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(area * ratio))
        crop_h = round(math.sqrt(area / ratio))
        if 0 < crop_w <= w and 0 < crop_h <= h:
            top = int(rng.integers(0, h - crop_h + 1))
            left = int(rng.integers(0, w - crop_w + 1))
            break
    else:
        crop_h = crop_w = min(h, w)
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
    box = image[top : top + crop_h, left : left + crop_w]
    interpolation = cv2.INTER_AREA if crop_h * crop_w > size * size else cv2.INTER_LINEAR
    out = cv2.resize(box, (size, size), interpolation=interpolation)
    return out[:, ::-1] if rng.random() < 0.5 else out


def resize_center_crop(
    image: np.ndarray, resize: int = IMAGENET_EVAL_RESIZE, crop: int = IMAGENET_CROP
) -> np.ndarray:
    """ImageNet eval: shorter side to 256, centre 224 crop."""
    return center_crop(resize_shorter_side(image, resize), crop)


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray | None = None) -> np.ndarray:
    """(image - mean) / std as float32; `mean` may be per channel (3,) or per pixel (H, W, 3)."""
    out = image.astype(np.float32) - mean
    return out / std if std is not None else out


# --- Device (jax) ----------------------------------------------------------------------------


def pad_crop_flip_batch(images: jax.Array, key: jax.Array, pad: int = CIFAR_PAD) -> jax.Array:
    """`pad_crop_flip` for a batch inside jit: each image gets its own offsets and flip."""
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offset_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (n,))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)
