"""A record to the network's input: the record checked and its image decoded, cropped and
augmented on the host as uint8 (resnet_jax.augment), and the normalisation (a registry: name ->
mean and std on the 0..255 scale) that the jitted steps apply on the device.

Images stay uint8 until they are on the accelerator: a quarter of float32's bytes through
Grain's shared memory, the host copies and the host-to-device link. `Preprocess.normalize` and
the cast to the compute dtype run inside the jitted steps.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from resnet_jax import augment, decode, paths
from resnet_jax.sources import (
    DatasetInfo,
    Record,
    check_data_dir,
    dataset_info,
    open_split,
    read_many,
)

logger = logging.getLogger('resnet_jax')


def check_record(record: Record, info: DatasetInfo) -> tuple[decode.Image, int]:
    """The image (decoded, or still encoded with its size read from the header) and label of
    a record; ValueError naming the record if they are malformed."""
    image = record['image']
    label = record['label']
    where = f'record {record.get("id", "?")!r} of {info.name}'
    if not isinstance(image, decode.EncodedImage):  # an encoded one: its header's shape
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f'{where}: image has shape {image.shape} and dtype {image.dtype}; expected '
                'uint8 (height, width, 3)'
            )
    if info.image_shape is not None and tuple(image.shape) != tuple(info.image_shape):
        raise ValueError(f'{where}: image has shape {image.shape}, expected {info.image_shape}')
    if not 0 <= int(label) < info.num_classes:
        raise ValueError(f'{where}: label {label} is outside [0, {info.num_classes})')
    return image, int(label)


@functools.cache
def pixel_mean(name: str, data_dir: str) -> np.ndarray:
    """The per-pixel mean image of the train split (the paper's CIFAR normalisation).

    Decoding all of CIFAR-10's training images takes seconds, so the result is kept in
    `paths.cache_dir()/pixel_mean/`, keyed by the split's files, their sizes and times: a dataset
    prepared again is measured again.
    """
    info = dataset_info(name, data_dir)
    stamp = [(f, *_stat(f)) for f in info.files.get('train', ())]
    key = hashlib.sha256(repr((name, stamp)).encode()).hexdigest()[:16]
    path = os.path.join(paths.cache_dir(), 'pixel_mean', f'{name}-{key}.npy')
    if stamp and os.path.exists(path):
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # unreadable: measure again and rewrite it
    source, _ = open_split(name, 'train', data_dir)
    total = np.zeros(np.asarray(source[0]['image']).shape, np.float64)
    for start in range(0, len(source), 2000):
        chunk = read_many(source, range(start, min(start + 2000, len(source))))
        total += np.sum([r['image'] for r in chunk], axis=0, dtype=np.float64)
    mean = (total / len(source)).astype(np.float32)
    if stamp:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f'{path}.{os.getpid()}.tmp.npy'
            np.save(tmp, mean)
            os.replace(tmp, path)  # whole or absent, whatever runs at the same time
        except OSError as e:
            logger.warning('could not cache the pixel mean in %s: %s', path, e)
    return mean


def _stat(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


# --- Normalisation: name -> (mean, std) on the 0..255 scale --------------------------------

Normalization = Callable[['DatasetInfo', str | None], tuple[np.ndarray, np.ndarray | None]]
NORMALIZATIONS: dict[str, Normalization] = {}


def register_normalization(name: str) -> Callable[[Normalization], Normalization]:
    """Registers `fn(info, data_dir) -> (mean, std or None)` as `dataset.normalization=name`."""

    def register(fn: Normalization) -> Normalization:
        NORMALIZATIONS[name] = fn
        return fn

    return register


@register_normalization('pixel_mean')
def _pixel_mean(info: DatasetInfo, data_dir: str | None) -> tuple[np.ndarray, None]:
    """The paper's: subtract the per-pixel mean image of the train split (fixed-size images;
    needs `data_dir`), or the per-channel mean where images have no fixed pixel grid."""
    if info.image_shape is None:
        return np.asarray(info.spec.mean, np.float32), None
    if data_dir is None:
        raise ValueError(f"normalization 'pixel_mean' of {info.name} needs data_dir")
    return pixel_mean(info.name, check_data_dir(data_dir)), None


@register_normalization('none')
def _no_normalization(info: DatasetInfo, data_dir: str | None) -> tuple[np.ndarray, None]:
    """Pixel values as they are, 0..255 (for a model that normalises its input itself)."""
    del info, data_dir
    return np.zeros(3, np.float32), None


@register_normalization('channel')
def _channel(info: DatasetInfo, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (x - mean) / std with the dataset's statistics (its spec)."""
    del data_dir
    return np.asarray(info.spec.mean, np.float32), np.asarray(info.spec.std, np.float32)


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # of RGB in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)


@register_normalization('imagenet')
def _imagenet(info: DatasetInfo, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel with ImageNet's statistics, whatever the dataset: what torchvision-style
    trainers use, so what weights trained by them expect (e.g. the converted CIFAR nets)."""
    del info, data_dir
    return 255 * np.asarray(IMAGENET_MEAN, np.float32), 255 * np.asarray(IMAGENET_STD, np.float32)


def _check_choice(value: Any, registry: dict, what: str) -> None:
    if value not in registry:
        raise ValueError(f'{what} {value!r} is invalid; expected one of {", ".join(registry)}')


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Turns one record into {'image': uint8, 'label': int32}, augmented when training; its
    `normalize` is what the jitted steps apply to a batch of those images on the device.

    A plain picklable object (not a closure), so Grain can send it to worker processes.
    """

    info: DatasetInfo
    ops: tuple[augment.Augmentation, ...]  # host operations, in order
    mean: Any = None  # float32 (3,) or (H, W, 3) on the 0..255 scale
    std: Any = None  # float32 (3,) or None (mean subtraction only, as the paper)
    ctx: augment.Context = dataclasses.field(default_factory=augment.Context)

    def __call__(self, record: Record, rng: np.random.Generator | None = None) -> Record:
        image, label = check_record(record, self.info)
        image = augment.apply_host(self.ops, image, rng, self.ctx)
        return {'image': image, 'label': np.int32(label)}

    def normalize(self, images: Any) -> Any:
        """uint8 images (..., H, W, 3) -> float32 (x - mean) / std, on the host (numpy) or
        traced inside jit (a jax.Array in, the statistics become constants of the step)."""
        return augment.normalize(images, self.mean, self.std)


def augmentation_chain(info: DatasetInfo, augmentation: str, *, train: bool) -> tuple:
    """The host operations of a split: the train chain ('default': the dataset's own), or the
    dataset's eval preprocessing (also for train with 'none': images must come out one size).

    Raises:
      ValueError: for an unknown operation, or one for another family of dataset.
    """
    spec = info.spec
    chain = spec.augmentation if augmentation == 'default' else augmentation
    ops = augment.parse_chain(chain) if train else []
    if not ops:
        ops = augment.parse_chain(spec.eval_preprocessing)
    for op in ops:
        if spec.family not in op.families:
            raise ValueError(
                f'augmentation {op.name!r} is for {" or ".join(op.families)} datasets; '
                f'{info.name} is a {spec.family} dataset'
            )
    return tuple(ops)


def make_preprocess(
    info: DatasetInfo,
    *,
    train: bool,
    data_dir: str | None = None,
    augmentation: str = 'default',
    normalization: str = 'pixel_mean',
    image_size: int = 0,
) -> Preprocess:
    """The preprocessing of the paper (default) or of modern practice.

    Args:
      augmentation: a chain of `augment.AUGMENTATIONS` ('pad_crop_flip+cutout'), 'default'
        (the dataset's own) or 'none'. Eval always gets the dataset's eval preprocessing.
      normalization: one of `NORMALIZATIONS`: 'pixel_mean' (the paper's) or 'channel'.
      image_size: the side of the crops of photographs (ImageNet family); 0: the paper's 224.
        The resize before the eval crop and the scale range follow in proportion.
    """
    _check_choice(normalization, NORMALIZATIONS, 'normalization')
    mean, std = NORMALIZATIONS[normalization](info, data_dir)
    ops = augmentation_chain(info, augmentation, train=train)
    return Preprocess(info, ops, mean, std, _context(info, image_size))


def _context(info: DatasetInfo, image_size: int) -> augment.Context:
    fill = tuple(round(v) for v in info.spec.mean)
    return augment.Context(crop_size=image_size or augment.IMAGENET_CROP, fill=fill)


def preprocess_of(dataset: Any, info: DatasetInfo, *, train: bool) -> Preprocess:
    """`make_preprocess` with the settings of a config's `dataset` section."""
    return make_preprocess(
        info,
        train=train,
        data_dir=dataset.data_dir,
        augmentation=dataset.augmentation,
        normalization=dataset.normalization,
        image_size=dataset.image_size,
    )


def input_shape(info: DatasetInfo, image_size: int = 0) -> tuple[int, int, int]:
    """The shape of the images the network sees: the dataset's own where it has one size
    (CIFAR), else square crops of `image_size` (0: 224)."""
    if info.image_shape is not None:
        return tuple(info.image_shape)
    side = image_size or augment.IMAGENET_CROP
    return (side, side, 3)


@dataclasses.dataclass(frozen=True)
class RunInput:
    """What a run's network expects of its images, recorded in each of its checkpoints: a
    reader (evaluate, predict, export, init_from) prepares images exactly as the run's own
    evaluation did without opening its dataset (the paper's pixel mean is the train split's).

    Attributes:
      image_shape: the dataset's own fixed shape (CIFAR), or None (photographs, cropped to
        `image_size`; 0: 224).
      mean, std: the normalisation, on the 0..255 scale (`Preprocess.normalize`).
    """

    dataset: str
    num_classes: int
    image_shape: tuple[int, ...] | None
    image_size: int
    class_names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray | None

    @classmethod
    def of(cls, preprocess: Preprocess, image_size: int) -> RunInput:
        info = preprocess.info
        shape = tuple(info.image_shape) if info.image_shape is not None else None
        std = None if preprocess.std is None else np.asarray(preprocess.std, np.float32)
        return cls(
            info.name,
            info.num_classes,
            shape,
            image_size,
            tuple(info.class_names),
            np.asarray(preprocess.mean, np.float32),
            std,
        )

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields['mean'] = self.mean.tolist()
        fields['std'] = None if self.std is None else self.std.tolist()
        return fields

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RunInput:
        shape = values['image_shape']
        std = values['std']
        return cls(
            values['dataset'],
            int(values['num_classes']),
            None if shape is None else tuple(shape),
            int(values['image_size']),
            tuple(values['class_names']),
            np.asarray(values['mean'], np.float32),
            None if std is None else np.asarray(std, np.float32),
        )

    def info(self) -> DatasetInfo:
        """The dataset's info as far as preparing images needs it (no files, no splits)."""
        return DatasetInfo(
            self.dataset, self.num_classes, self.image_shape, {}, class_names=self.class_names
        )

    def eval_preprocess(self) -> Preprocess:
        """The run's eval preprocessing: the dataset's eval crop, then its normalisation."""
        info = self.info()
        ops = augmentation_chain(info, 'default', train=False)
        return Preprocess(info, ops, self.mean, self.std, _context(info, self.image_size))

    def network_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of the images the network sees."""
        return input_shape(self.info(), self.image_size)
