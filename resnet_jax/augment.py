"""Image augmentation, as a registry of named operations with host and device versions.

An operation is registered once with `register_augmentation(name, host=..., device=...)`:

* host: `fn(image, rng, ctx) -> image` on one uint8 HWC numpy image with a
  `numpy.random.Generator` (Grain hands each example its own, seeded by (seed, index), so
  results do not depend on the number of worker processes). Registered with
  `takes_encoded=True`, it may get the image still encoded (`resnet_jax.decode.EncodedImage`)
  and decode only the pixels it needs (`decode.decode_at_least`): the ImageNet crops do;
  every other operation gets decoded pixels;
* device: `fn(images, key, ctx) -> images` on a uint8 NHWC batch inside `jit` with a
  `jax.random` key, for pipelines that keep the data on the accelerator. Both versions draw
  from the same distribution (tests compare them).

`dataset.augmentation` is a '+'-joined chain of names ('pad_crop_flip+cutout'), 'default' for
the dataset's own (`resnet_jax.datasets`), or 'none'. The paper's:

* CIFAR (section 4.2), 'pad_crop_flip': pad 4 pixels with zeros, random 32x32 crop, flip.
* ImageNet (section 3.4), 'scale_crop_flip': shorter side resized to a random size in
  [256, 480], random 224x224 crop, flip; or 'inception_crop_flip', the Inception-style random
  resized crop. Eval, 'resize_center_crop': shorter side to 256, centre 224x224 crop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import decode

CIFAR_PAD = 4
IMAGENET_CROP = 224
IMAGENET_EVAL_RESIZE = 256
IMAGENET_SCALE_RANGE = (256, 480)  # the paper's shorter-side range
INCEPTION_AREA_RANGE = (0.08, 1.0)
INCEPTION_RATIO_RANGE = (3 / 4, 4 / 3)
CUTOUT_SIZE = 16  # DeVries & Taylor (2017): one 16x16 square on CIFAR-10


@dataclasses.dataclass(frozen=True)
class Context:
    """What operations may need besides the image: the output size of crops (ImageNet family)
    and the fill colour for erased pixels (the dataset's mean, so it normalises to zero)."""

    crop_size: int = IMAGENET_CROP
    fill: tuple[int, int, int] = (0, 0, 0)


HostOp = Callable[[np.ndarray, np.random.Generator, Context], np.ndarray]
DeviceOp = Callable[[jax.Array, jax.Array, Context], jax.Array]


@dataclasses.dataclass(frozen=True)
class Augmentation:
    name: str
    host: HostOp | None
    device: DeviceOp | None
    doc: str
    families: tuple[str, ...]  # which datasets it makes sense for (resnet_jax.datasets.FAMILIES)
    takes_encoded: bool = False  # the host version accepts a decode.EncodedImage


AUGMENTATIONS: dict[str, Augmentation] = {}


def register_augmentation(
    name: str,
    *,
    host: HostOp | None = None,
    device: DeviceOp | None = None,
    doc: str = '',
    families: tuple[str, ...] = ('cifar', 'imagenet'),
    takes_encoded: bool = False,
) -> None:
    """Makes `name` usable in `dataset.augmentation` chains; at least one version is needed.

    `families` says for which datasets it is meant (`resnet_jax.datasets`): the ImageNet crops
    are refused on CIFAR, where they would turn 32-pixel images into 224-pixel ones.
    `takes_encoded`: the host version decodes an `EncodedImage` itself (see the module doc).
    """
    if host is None and device is None:
        raise ValueError(f'augmentation {name!r} needs a host or a device version')
    AUGMENTATIONS[name] = Augmentation(name, host, device, doc, tuple(families), takes_encoded)


def parse_chain(chain: str) -> list[Augmentation]:
    """'pad_crop_flip+cutout' -> the registered operations, in order ('none' or '': none).

    Raises:
      ValueError: naming an unknown operation and the registered ones.
    """
    if not isinstance(chain, str):
        raise ValueError(f'an augmentation chain is a string such as pad_crop_flip, got {chain!r}')
    names = [n.strip() for n in chain.split('+') if n.strip() and n.strip() != 'none']
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(
            f'unknown augmentation {unknown[0]!r} in {chain!r}; expected names from '
            f'{", ".join(AUGMENTATIONS)} joined by +, or none'
        )
    return [AUGMENTATIONS[n] for n in names]


def apply_host(
    ops: Sequence[Augmentation], image: decode.Image, rng: np.random.Generator, ctx: Context
) -> np.ndarray:
    """Runs the host versions of `ops` on one image (decoded, or still encoded: then decoded
    by the first operation, at reduced scale where it can be), and returns its pixels.

    Raises:
      ValueError: for an operation that exists only on the device, or an image that cannot be
        decoded (naming it).
    """
    for op in ops:
        if op.host is None:
            raise ValueError(f'augmentation {op.name!r} runs only on the device (in-memory data)')
        image = op.host(image if op.takes_encoded else decode.as_array(image), rng, ctx)
    return decode.as_array(image)


def apply_device(
    ops: Sequence[Augmentation], images: jax.Array, key: jax.Array, ctx: Context
) -> jax.Array:
    """Runs the device versions of `ops` on a batch, each with its own key."""
    for i, op in enumerate(ops):
        if op.device is None:
            raise ValueError(
                f'augmentation {op.name!r} has no device version; use the host pipeline'
            )
        images = op.device(images, jax.random.fold_in(key, i), ctx)
    return images


# --- Host (numpy) ----------------------------------------------------------------------------


def pad_crop(image: np.ndarray, rng: np.random.Generator, pad: int = CIFAR_PAD) -> np.ndarray:
    """Zero-pad by `pad`, then a random crop of the original size."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top : top + h, left : left + w]


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = CIFAR_PAD) -> np.ndarray:
    """The paper's CIFAR augmentation: zero-pad, random crop of the original size, flip."""
    crop = pad_crop(image, rng, pad)
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A horizontal flip with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def cutout(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int = CUTOUT_SIZE,
    fill: Sequence[int] = (0, 0, 0),
) -> np.ndarray:
    """Cutout (DeVries & Taylor, 2017): a size x size square, centred anywhere in the image
    (so it may be cut off at the border), set to `fill`."""
    h, w = image.shape[:2]
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    top, left = max(0, cy - size // 2), max(0, cx - size // 2)
    out = image.copy()
    out[top : cy - size // 2 + size, left : cx - size // 2 + size] = np.asarray(fill, image.dtype)
    return out


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
    image: decode.Image,
    rng: np.random.Generator,
    scale_range: tuple[int, int] = IMAGENET_SCALE_RANGE,
    crop: int = IMAGENET_CROP,
) -> np.ndarray:
    """The paper's ImageNet augmentation: random shorter side, random crop, flip."""
    shorter = int(rng.integers(scale_range[0], scale_range[1] + 1))
    image, _, _ = decode.decode_at_least(image, min(image.shape[:2]) / shorter)
    image = resize_shorter_side(image, shorter)
    h, w = image.shape[:2]
    top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    image = image[top : top + crop, left : left + crop]
    return image[:, ::-1] if rng.random() < 0.5 else image


def random_resized_crop(
    image: decode.Image,
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
    # The box in the pixels of a reduced decode: its side still at least `size`.
    image, sy, sx = decode.decode_at_least(image, min(crop_h, crop_w) / size)
    if (sy, sx) != (1.0, 1.0):
        crop_h, crop_w = max(1, round(crop_h * sy)), max(1, round(crop_w * sx))
        top = min(round(top * sy), image.shape[0] - crop_h)
        left = min(round(left * sx), image.shape[1] - crop_w)
    box = image[top : top + crop_h, left : left + crop_w]
    interpolation = cv2.INTER_AREA if crop_h * crop_w > size * size else cv2.INTER_LINEAR
    out = cv2.resize(box, (size, size), interpolation=interpolation)
    return out[:, ::-1] if rng.random() < 0.5 else out


def resize_center_crop(
    image: decode.Image, resize: int = IMAGENET_EVAL_RESIZE, crop: int = IMAGENET_CROP
) -> np.ndarray:
    """ImageNet eval: shorter side to 256, centre 224 crop."""
    image, _, _ = decode.decode_at_least(image, min(image.shape[:2]) / resize)
    return center_crop(resize_shorter_side(image, resize), crop)


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray | None = None) -> np.ndarray:
    """(image - mean) / std as float32; `mean` may be per channel (3,) or per pixel (H, W, 3).

    numpy in, numpy out; a jax.Array (inside jit: the train, eval and serving functions) in,
    a jax.Array out, with the same float32 arithmetic.
    """
    out = image.astype(np.float32) - mean
    return out / std if std is not None else out


# --- Device (jax) ----------------------------------------------------------------------------


def _crop_batch(images: jax.Array, offsets: jax.Array, pad: int) -> jax.Array:
    _, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def _flip_batch(images: jax.Array, flips: jax.Array) -> jax.Array:
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def pad_crop_batch(images: jax.Array, key: jax.Array, pad: int = CIFAR_PAD) -> jax.Array:
    """`pad_crop` for a batch inside jit: each image gets its own offsets."""
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * pad + 1)
    return _crop_batch(images, offsets, pad)


def flip_batch(images: jax.Array, key: jax.Array) -> jax.Array:
    """`flip` for a batch inside jit."""
    return _flip_batch(images, jax.random.bernoulli(key, 0.5, (images.shape[0],)))


def pad_crop_flip_batch(images: jax.Array, key: jax.Array, pad: int = CIFAR_PAD) -> jax.Array:
    """`pad_crop_flip` for a batch inside jit: each image gets its own offsets and flip."""
    offset_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (images.shape[0], 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (images.shape[0],))
    return _flip_batch(_crop_batch(images, offsets, pad), flips)


def cutout_batch(
    images: jax.Array, key: jax.Array, size: int = CUTOUT_SIZE, fill: Sequence[int] = (0, 0, 0)
) -> jax.Array:
    """`cutout` for a batch inside jit: each image gets its own square."""
    n, h, w, _ = images.shape
    cy_key, cx_key = jax.random.split(key)
    cy = jax.random.randint(cy_key, (n, 1, 1), 0, h)
    cx = jax.random.randint(cx_key, (n, 1, 1), 0, w)
    rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    top, left = cy - size // 2, cx - size // 2
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return jnp.where(inside[..., None], jnp.asarray(fill, images.dtype), images)


# --- The registry --------------------------------------------------------------------------


def _scaled(size: int, ctx: Context) -> int:
    """A size of the paper's 224-pixel recipe (256, 480) for crops of `ctx.crop_size`."""
    return round(size * ctx.crop_size / IMAGENET_CROP)


register_augmentation(
    'pad_crop_flip',
    host=lambda x, rng, ctx: pad_crop_flip(x, rng),
    device=lambda x, key, ctx: pad_crop_flip_batch(x, key),
    doc='CIFAR (the paper, section 4.2): zero-pad 4, random crop, horizontal flip',
)
register_augmentation(
    'pad_crop',
    host=lambda x, rng, ctx: pad_crop(x, rng),
    device=lambda x, key, ctx: pad_crop_batch(x, key),
    doc='zero-pad 4, random crop; no flip (digits, text)',
)
register_augmentation(
    'flip',
    host=lambda x, rng, ctx: flip(x, rng),
    device=lambda x, key, ctx: flip_batch(x, key),
    doc='horizontal flip with probability 1/2',
)
register_augmentation(
    'scale_crop_flip',
    families=('imagenet',),
    takes_encoded=True,
    host=lambda x, rng, ctx: scale_augment(
        x, rng, tuple(_scaled(s, ctx) for s in IMAGENET_SCALE_RANGE), crop=ctx.crop_size
    ),
    doc='ImageNet (the paper, section 3.4): shorter side random in [256, 480], random 224 '
    'crop, flip',
)
register_augmentation(
    'inception_crop_flip',
    families=('imagenet',),
    takes_encoded=True,
    host=lambda x, rng, ctx: random_resized_crop(x, rng, size=ctx.crop_size),
    doc='Inception-style random resized crop to 224 (area 8-100%, ratio 3/4-4/3), flip',
)
register_augmentation(
    'resize_center_crop',
    families=('imagenet',),
    takes_encoded=True,
    host=lambda x, rng, ctx: resize_center_crop(
        x, resize=_scaled(IMAGENET_EVAL_RESIZE, ctx), crop=ctx.crop_size
    ),
    doc='ImageNet eval: shorter side to 256, centre 224 crop',
)
# Cutout: docs/extending.md's example of an augmentation added in one place.
register_augmentation(
    'cutout',
    host=lambda x, rng, ctx: cutout(x, rng, fill=ctx.fill),
    device=lambda x, key, ctx: cutout_batch(x, key, fill=ctx.fill),
    doc="Cutout (DeVries & Taylor, 2017): one 16x16 square set to the dataset's mean colour",
)
