"""Datasets: TFDS sources read through Grain, per-process shards, resumable order, exact eval.

* `open_split(name, split, data_dir)` returns a random-access source over a prepared TFDS
  dataset (ArrayRecord, read with `tfds.data_source`: TensorFlow is never imported), with the
  paper's CIFAR holdout splits `train_45k` / `val_5k` on top of any TFDS split string; or,
  for `dataset.name='folder'`, over a folder of class sub-folders of images (resnet_jax.folder).
* `train_dataset(...)` is an endless, shuffled, augmented, batched Grain `IterDataset` of this
  process's shard. Its order depends only on the seed (never on the number of worker
  processes), each epoch reshuffles with seed + epoch, and `get_state()` / `set_state()` on
  its iterator resume at exactly the next batch.
* `eval_dataset(...)` visits every example of the split exactly once over all processes: the
  last batches are padded and carry `mask`, so metrics are masked sums over real examples.
* `load_arrays` + `in_memory_train_batch` are the fast path for small datasets: decode once,
  keep uint8 arrays on the accelerator, and draw and augment inside jit from (key, step).

Batches are dicts of numpy arrays: `image` uint8 (N, H, W, 3), `label` int32 (N,), and for
eval `mask` bool (N,). `resnet_jax.sharding.global_batch` turns them into global jax.Arrays.
Images stay uint8 until they are on the accelerator: a quarter of float32's bytes through
Grain's shared memory, the host copies and the host-to-device link. The normalisation
(`Preprocess.normalize`) and the cast to the compute dtype run inside the jitted steps.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import augment, datasets, decode, folder, sharding, workers

logger = logging.getLogger('resnet_jax')

Batch = dict[str, np.ndarray]
Record = dict[str, Any]

# The paper's CIFAR model-selection holdout (section 4.2: "45k/5k train/val split"): a fixed
# permutation of the 50,000 training images; its last 5,000 are the validation set.
HOLDOUT_SPLITS = ('train_45k', 'val_5k')
HOLDOUT_VAL_SIZE = 5000
HOLDOUT_SEED = 20151210  # the paper's arXiv date; never change it, or the split changes


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs to know about a prepared dataset: its spec (registered, see
    `resnet_jax.datasets`) and what its files say."""

    name: str
    num_classes: int
    image_shape: tuple[int, ...] | None  # None when images vary in size (ImageNet)
    splits: dict[str, int]  # base split name -> number of examples
    # base split name -> its files (ArrayRecord), to name them when one is damaged
    files: dict[str, tuple[str, ...]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )
    spec: datasets.DatasetSpec | None = dataclasses.field(default=None, compare=False, repr=False)
    class_names: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self):
        if self.spec is None:
            object.__setattr__(self, 'spec', datasets.spec(self.name))

    @property
    def family(self) -> str:
        return self.spec.family


def _check_data_dir(data_dir: str) -> str:
    if '://' in os.fspath(data_dir):
        raise ValueError(
            f'data_dir {data_dir!r} is a cloud storage URL; the input pipeline reads local '
            f'files: copy the prepared dataset to local disk (gcloud storage cp -r '
            f'{os.fspath(data_dir).rstrip("/")}/DATASET /mnt/tfds/) or mount the bucket, and pass '
            'that path'
        )
    data_dir = os.path.expanduser(os.fspath(data_dir))
    if not os.path.exists(data_dir):
        raise ValueError(f'data_dir {data_dir!r} does not exist; expected a TFDS data directory')
    if not os.path.isdir(data_dir):
        raise ValueError(f'data_dir {data_dir!r} is not a directory')
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise ValueError(f'data_dir {data_dir!r} is not readable')
    return data_dir


def _prepare_command(name: str, data_dir: str) -> str:
    first = datasets.spec(name).prepare.format(data_dir=data_dir)
    return (
        f'{first}, then ' if first else ''
    ) + f"pip install '.[tf]' && tfds build {name} --file_format=array_record --data_dir={data_dir}"


def dataset_info(name: str, data_dir: str, *, download: bool = False) -> DatasetInfo:
    """Reads a prepared dataset's metadata; prepares it first if allowed.

    Raises:
      ValueError: with the missing dataset, the directory, and the command that prepares it.
    """
    if not isinstance(name, str) or not re.fullmatch(r'[a-z0-9_]+(:[0-9.]+)?', name):
        raise ValueError(f'dataset name must be a TFDS name such as cifar10, got {name!r}')
    if datasets.spec(name).source == 'folder':
        return _folder_info(folder.scan(data_dir))
    import tensorflow_datasets as tfds

    data_dir = _check_data_dir(data_dir)
    base_name = name.split(':')[0]
    spec = datasets.spec(name)
    if not os.path.isdir(os.path.join(data_dir, base_name)):
        if not download:
            raise ValueError(
                f'dataset {name!r} is not prepared in {data_dir}; prepare it with: '
                f'{_prepare_command(base_name, data_dir)}'
            )
        _download_and_prepare(name, data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        features = builder.info.features
        num_classes = int(features['label'].num_classes)
        class_names = tuple(features['label'].names)
        shape = features['image'].shape
    except Exception as e:  # tfds raises many types for a damaged directory
        raise ValueError(
            f'cannot read dataset {name!r} in {data_dir} ({type(e).__name__}: {e}); expected a '
            f'TFDS directory with image and label features, as made by '
            f'{_prepare_command(base_name, data_dir)}'
        ) from None
    image_shape = tuple(shape) if shape is not None and None not in shape else None
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    files = {
        split: tuple(os.fspath(p) for p in info.filepaths)
        for split, info in builder.info.splits.items()
    }
    if not splits:
        raise ValueError(
            f'dataset {name!r} in {data_dir} has no prepared splits (an interrupted build?); '
            f'prepare it with: {_prepare_command(base_name, data_dir)}'
        )
    return DatasetInfo(base_name, num_classes, image_shape, splits, files, spec, class_names)


def _folder_info(index: folder.FolderIndex) -> DatasetInfo:
    splits = {split: len(examples) for split, examples in index.splits.items()}
    spec = datasets.spec(folder.NAME)
    return DatasetInfo(
        folder.NAME, len(index.class_names), None, splits, {}, spec, index.class_names
    )


def _download_and_prepare(name: str, data_dir: str) -> None:
    import tensorflow_datasets as tfds

    try:
        tfds.builder(name, data_dir=data_dir).download_and_prepare(file_format='array_record')
    except Exception as e:  # offline, no TensorFlow, no manual files, ...
        raise ValueError(
            f'could not prepare dataset {name!r} in {data_dir} ({type(e).__name__}: {e}); '
            f'prepare it by hand with: {_prepare_command(name.split(":")[0], data_dir)}'
        ) from None


class _Subset(Sequence):
    """A random-access view of `source` at `indices` (for the holdout splits)."""

    def __init__(self, source: Sequence, indices: np.ndarray):
        self._source = source
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> Record:
        return self._source[int(self._indices[index])]

    def __getitems__(self, indices: Sequence[int]) -> list[Record]:
        return _read_many(self._source, [int(self._indices[i]) for i in indices])

    def read_encoded(self, indices: Sequence[int]) -> list[Record]:
        return read_encoded(self._source, [int(self._indices[i]) for i in indices])


def holdout_indices(num_train: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the train split of the 45k/5k holdout: (train_45k, val_5k), disjoint."""
    permutation = np.random.default_rng(HOLDOUT_SEED).permutation(num_train)
    return np.sort(permutation[:-HOLDOUT_VAL_SIZE]), np.sort(permutation[-HOLDOUT_VAL_SIZE:])


def open_split(
    name: str, split: str, data_dir: str, *, download: bool = False
) -> tuple[Sequence[Record], DatasetInfo]:
    """A random-access source over one split, and the dataset's info.

    Args:
      name: a prepared TFDS dataset in `data_dir` (cifar10, cifar100, imagenet2012,
        cifar10_jpeg, ...).
      split: any TFDS split string ('train', 'test[:1000]', 'train[:10%]+test', ...), or
        'train_45k' / 'val_5k', the paper's CIFAR holdout drawn from 'train'.
      data_dir: the TFDS data directory.
      download: prepare a registered dataset that is missing (needs internet and TensorFlow).
    """
    if (
        isinstance(name, str)
        and name in datasets.DATASETS
        and datasets.spec(name).source == 'folder'
    ):
        source, index = folder.open_split(split, data_dir)
        return source, _folder_info(index)
    import tensorflow_datasets as tfds

    # Images stay encoded as read: `_NamedRecords` decodes them (OpenCV), or hands them on
    # encoded to the pipeline, whose crops decode only the pixels they need.
    undecoded = {'image': tfds.decode.SkipDecoding()}
    info = dataset_info(name, data_dir, download=download)
    data_dir = _check_data_dir(data_dir)
    valid = [*info.splits, *HOLDOUT_SPLITS]
    if not isinstance(split, str):
        raise ValueError(f'split must be a string such as train, got {split!r}')
    if split in HOLDOUT_SPLITS:
        if info.splits.get('train', 0) <= HOLDOUT_VAL_SIZE:
            raise ValueError(
                f'split {split!r} holds {HOLDOUT_VAL_SIZE} of the train examples out, but '
                f'{name} has {info.splits.get("train", 0)} train examples'
            )
        _verify_files(info.files.get('train', ()))
        train = tfds.data_source(name, split='train', data_dir=data_dir, decoders=undecoded)
        train = _NamedRecords(train, f'split {split!r} of {name}', info.files.get('train', ()))
        indices = holdout_indices(len(train))[HOLDOUT_SPLITS.index(split)]
        return _Subset(train, indices), info
    bases = []
    for part in split.split('+'):
        base = re.split(r'[\[(]', part, maxsplit=1)[0].strip()
        if base not in info.splits:
            raise ValueError(
                f'dataset {name!r} has no split {base!r} (asked for {split!r}); expected one of '
                f'{", ".join(valid)}'
            )
        bases.append(base)
    files = tuple(f for base in dict.fromkeys(bases) for f in info.files.get(base, ()))
    _verify_files(files)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, decoders=undecoded)
    except Exception as e:  # a malformed slice such as 'train[:x]'
        raise ValueError(f'cannot read split {split!r} of {name!r}: {e}') from None
    return _NamedRecords(source, f'split {split!r} of {name}', files), info


# Files up to this size are read whole (without decoding) when a split is opened, so a damaged
# one stops the run before anything is written: CIFAR-10's 53 MB take 0.4 s. Larger datasets
# (ImageNet) are checked record by record as they are read.
VERIFY_MAX_BYTES = 1 << 30


def _damaged(file: str, error: Exception) -> ValueError:
    reason = ' '.join(str(error).split())[:200]
    dataset_dir = os.path.dirname(os.path.dirname(file))
    return ValueError(
        f'dataset file {file} is damaged ({type(error).__name__}: {reason}); delete '
        f'{dataset_dir} and prepare it again (the shared CIFAR-10 copy: make data)'
    )


@functools.cache
def _verify_files_once(files: tuple[str, ...], stamp: tuple) -> None:
    del stamp  # part of the cache key: a file replaced since is verified again
    from array_record.python import array_record_module

    for file in files:
        try:
            reader = array_record_module.ArrayRecordReader(file, 'readahead_buffer_size:0')
            try:
                n = reader.num_records()
                for start in range(0, n, 4096):
                    reader.read(list(range(start, min(n, start + 4096))))
            finally:
                reader.close()
        except Exception as e:  # Riegeli raises RuntimeError/ValueError for damaged chunks
            raise _damaged(file, e) from None


def _verify_files(files: tuple[str, ...]) -> None:
    """Reads every record of `files` (undecoded) if they are small enough; ValueError naming a
    damaged one."""
    try:
        stats = [os.stat(f) for f in files]
    except OSError as e:
        raise ValueError(f'dataset file {e.filename} cannot be read: {e.strerror}') from None
    if files and sum(s.st_size for s in stats) <= VERIFY_MAX_BYTES:
        _verify_files_once(tuple(files), tuple((s.st_size, s.st_mtime_ns) for s in stats))


class _NamedRecords(Sequence):
    """A TFDS source (read with its images undecoded) whose records come with their images
    decoded, or, from `read_encoded`, still encoded (`decode.EncodedImage`); read errors name
    the dataset, split, record and files."""

    def __init__(self, source: Sequence, what: str, files: tuple[str, ...]):
        self._source = source
        self._what = what
        self._files = files

    def __len__(self) -> int:
        return len(self._source)

    def _error(self, where: str, error: Exception) -> ValueError:
        return ValueError(
            f'cannot read record {where} of {self._what} ({", ".join(self._files) or "?"}): '
            f'{type(error).__name__}: {" ".join(str(error).split())[:200]}; the dataset files '
            'are damaged: delete the dataset directory and prepare it again (make data)'
        )

    def _with_encoded(self, index: int, record: Record) -> Record:
        where = f'record {index} of {self._what} ({", ".join(self._files) or "?"})'
        # Without the EXIF orientation, as TensorFlow's and torchvision's decoders read them.
        image = decode.EncodedImage(bytes(record['image']), where, orient=False)
        return {**record, 'image': image}

    def read_encoded(self, indices: Sequence[int]) -> list[Record]:
        """The records at `indices` (one read), their images still encoded."""
        indices = [int(i) for i in indices]
        try:
            records = _read_many(self._source, indices)
        except Exception as e:
            raise self._error(f'{min(indices)}..{max(indices)}', e) from None
        return [self._with_encoded(i, r) for i, r in zip(indices, records, strict=True)]

    def __getitem__(self, index: int) -> Record:
        try:
            record = self._source[index]
        except IndexError:
            raise
        except Exception as e:
            raise self._error(str(index), e) from None
        return _decoded(self._with_encoded(index, record))

    def __getitems__(self, indices: Sequence[int]) -> list[Record]:
        return [_decoded(r) for r in self.read_encoded(indices)]


def _decoded(record: Record) -> Record:
    return {**record, 'image': decode.as_array(record['image'])}


def read_encoded(source: Sequence, indices: Sequence[int]) -> list[Record]:
    """The records of `source` at `indices`, their images encoded where the source keeps them
    so (TFDS datasets, image folders), else decoded arrays: `Preprocess` takes both."""
    reader = getattr(source, 'read_encoded', None)
    return reader(list(indices)) if reader else _read_many(source, indices)


# --- Preprocessing ---------------------------------------------------------------------------


def _check_record(record: Record, info: DatasetInfo) -> tuple[decode.Image, int]:
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


CACHE_DIR_ENV = 'RESNET_JAX_CACHE_DIR'  # default: ~/.cache/resnet_jax


def cache_dir() -> str:
    """Where derived data (the pixel mean) is kept between runs."""
    return os.environ.get(CACHE_DIR_ENV) or os.path.expanduser('~/.cache/resnet_jax')


@functools.cache
def pixel_mean(name: str, data_dir: str) -> np.ndarray:
    """The per-pixel mean image of the train split (the paper's CIFAR normalisation).

    Decoding all of CIFAR-10's training images takes seconds, so the result is kept in
    `cache_dir()/pixel_mean/`, keyed by the split's files, their sizes and times: a dataset
    prepared again is measured again.
    """
    info = dataset_info(name, data_dir)
    stamp = [(f, *_stat(f)) for f in info.files.get('train', ())]
    key = hashlib.sha256(repr((name, stamp)).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), 'pixel_mean', f'{name}-{key}.npy')
    if stamp and os.path.exists(path):
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # unreadable: measure again and rewrite it
    source, _ = open_split(name, 'train', data_dir)
    total = np.zeros(np.asarray(source[0]['image']).shape, np.float64)
    for start in range(0, len(source), 2000):
        chunk = _read_many(source, range(start, min(start + 2000, len(source))))
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


def _read_many(source: Sequence, indices: Sequence[int]) -> list[Record]:
    getitems = getattr(source, '__getitems__', None)
    return getitems(list(indices)) if getitems else [source[i] for i in indices]


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
    return pixel_mean(info.name, _check_data_dir(data_dir)), None


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
        image, label = _check_record(record, self.info)
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
    fill = tuple(round(v) for v in info.spec.mean)
    ctx = augment.Context(crop_size=image_size or augment.IMAGENET_CROP, fill=fill)
    return Preprocess(info, augmentation_chain(info, augmentation, train=train), mean, std, ctx)


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


# --- Grain pipelines -------------------------------------------------------------------------


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f'process_index {index} is outside [0, {count})')
    return index, count


def _check_batch(batch_size: int, what: str = 'batch_size') -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f'{what} must be a positive int, got {batch_size!r}')


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the examples: a permutation from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


# Each process decodes and augments one image per thread: OpenCV's own threads inside each
# call would compete with Grain's workers and the read threads for the same cores (on this
# 2-core machine they made in-process reading slower when threads were added).
_OPENCV_THREADS_SET: set[int] = set()


def _one_opencv_thread() -> None:
    if os.getpid() not in _OPENCV_THREADS_SET:
        import cv2

        cv2.setNumThreads(1)
        _OPENCV_THREADS_SET.add(os.getpid())


_POOLS: dict[tuple[int, int], concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def map_examples(fn: Callable[[int], Record], count: int, threads: int) -> list[Record]:
    """[fn(0), ..., fn(count - 1)], by `threads` threads of this process (1: one after another).

    The examples of a batch are decoded and augmented in parallel (OpenCV and numpy release
    the GIL); each has its own random generator, so the results do not depend on `threads`.
    """
    if threads <= 1 or count <= 1:
        return [fn(j) for j in range(count)]
    key = (os.getpid(), threads)  # a pool per process: Grain's workers are processes
    with _POOLS_LOCK:  # the prefetch thread and an evaluation may ask at once
        if key not in _POOLS:
            _POOLS[key] = concurrent.futures.ThreadPoolExecutor(threads, 'resnet_jax-read')
        pool = _POOLS[key]
    return list(pool.map(fn, range(count)))


def _stack(examples: list[Record]) -> Record:
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


@dataclasses.dataclass(frozen=True)
class _ReadSliceOfGlobalBatch:
    """Global batch b of the shuffled stream: this process's slice of it, read and augmented.

    A pure function of b (plus the seed): epoch e = b // batches_per_epoch visits the examples in
    `epoch_order(seed, e)`, global batch b takes the next `global_batch_size` of them (the last
    partial batch of an epoch is dropped), and the example at position j of the global batch is
    augmented with the generator (seed, b, j). Nothing depends on how many processes or devices
    share the batch, so the batches and the losses are the same on any topology, and a run
    resumed at step s (on any topology) continues with exactly global batch s.

    The slice's records are read at once (one ArrayRecord read is a fraction of the cost of
    one read per record), their images still encoded; each example is then decoded and
    augmented on its own, `threads` at a time (`map_examples`).
    """

    source: Any
    preprocess: Callable[[Record, np.random.Generator], Record]
    seed: int
    global_batch_size: int
    start: int  # position of this process's first example in each global batch
    size: int  # examples per process
    threads: int = 1

    def __call__(self, b: int) -> Record:
        _one_opencv_thread()
        n = len(self.source)
        epoch, position = divmod(b, n // self.global_batch_size)
        first = position * self.global_batch_size + self.start
        indices = epoch_order(self.seed, epoch, n)[first : first + self.size]
        records = read_encoded(self.source, indices.tolist())

        def example(j: int) -> Record:
            return self.preprocess(
                records[j], np.random.default_rng([self.seed, b, self.start + j])
            )

        return _stack(map_examples(example, len(records), self.threads))


def train_dataset(
    source: Sequence[Record],
    preprocess: Callable[[Record, np.random.Generator], Record],
    *,
    batch_size: int,
    seed: int,
    start_batch: int = 0,
    num_workers: int = 0,
    read_threads: int = 1,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Endless shuffled, augmented batches: this process's slice of each global batch.

    The global batches (batch_size x process_count examples) are the same whatever the number
    of processes: process i reads examples [i * batch_size, (i + 1) * batch_size) of each, so
    the processes read disjoint examples and together exactly the global batch. The first
    element is global batch `start_batch`: the trainer resumes at step s with start_batch=s, so
    a checkpoint needs no iterator state, and none that depends on the topology.

    Args:
      source: from `open_split`.
      preprocess: from `make_preprocess(..., train=True)`.
      batch_size: this process's batch (the global batch / the number of processes; see
        `resnet_jax.sharding.local_batch_size`).
      seed: the shuffle and augmentation seed (a non-negative int).
      start_batch: the global batch to start from (the number of steps already taken).
      num_workers: Grain worker processes, each making whole batches in turn (0: in this
        process).
      read_threads: threads per process that decode and augment the images of a batch in
        parallel (1: one after another). The batches are identical for any number of workers
        and threads.
      process_index, process_count: this process's slice (default: JAX's).
    """
    _check_batch(batch_size)
    _check_count(read_threads, 'read_threads', minimum=1)
    index, count = _process(process_index, process_count)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be an int >= 0, got {seed!r}')
    global_batch_size = batch_size * count
    if len(source) < global_batch_size:
        raise ValueError(
            f'the global batch of {global_batch_size} ({count} processes x {batch_size}) exceeds '
            f'the {len(source)} examples of the split'
        )
    read = _ReadSliceOfGlobalBatch(
        source,
        preprocess,
        int(seed),
        global_batch_size,
        index * batch_size,
        batch_size,
        int(read_threads),
    )
    if not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
        raise ValueError(f'start_batch must be an int >= 0, got {start_batch!r}')
    batches = grain.MapDataset.range(int(start_batch), 2**62)  # global batch numbers, endless
    return _prefetch(batches.map(read), num_workers)


def _check_count(value: Any, what: str, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f'{what} must be an int >= {minimum}, got {value!r}')


# Batches are made on demand, by the caller (the trainer's device-prefetch thread) or by Grain's
# workers, which keep one each ready. Grain's default (16 threads, 500 elements read ahead)
# would hold hundreds of batches in memory (38 MB each for 256 images at 224) and run threads
# on top of the read threads and the workers.
_ON_DEMAND = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _prefetch(dataset: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    _check_count(num_workers, 'num_workers')
    iterable = dataset.to_iter_dataset(_ON_DEMAND)
    if not num_workers:
        return iterable
    from absl import flags

    # Grain reads absl flags; outside an absl app nobody has parsed them: take the defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return workers.prefetch(iterable, num_workers)


@dataclasses.dataclass(frozen=True)
class _ReadEvalBatch:
    """Eval batch k of this process's shard (examples index, index + count, ... of the split):
    its real examples, then masked-out zero copies of one up to the batch size."""

    source: Any
    preprocess: Callable[[Record], Record]
    index: int
    count: int
    batch_size: int
    threads: int = 1

    def __call__(self, k: int) -> Record:
        _one_opencv_thread()
        shard_size = len(range(self.index, len(self.source), self.count))
        positions = range(k * self.batch_size, min((k + 1) * self.batch_size, shard_size))
        records = read_encoded(self.source, [self.index + p * self.count for p in positions])
        examples = map_examples(lambda j: self.preprocess(records[j]), len(records), self.threads)
        padding = self.batch_size - len(examples)
        if padding:
            like = examples[0] if examples else self.preprocess(self.source[0])
            examples += [{key: np.zeros_like(v) for key, v in like.items()}] * padding
        batch = _stack(examples)
        batch['mask'] = np.arange(self.batch_size) < len(records)
        return batch


def eval_dataset(
    source: Sequence[Record],
    preprocess: Callable[[Record], Record],
    *,
    batch_size: int,
    num_workers: int = 0,
    read_threads: int = 1,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Every example of the split exactly once over all processes, in padded, masked batches.

    Every process yields the same number of batches (a jitted eval step is collective), so
    shards shorter than the longest are padded too. Workers and threads as `train_dataset`.
    """
    _check_batch(batch_size)
    _check_count(read_threads, 'read_threads', minimum=1)
    index, count = _process(process_index, process_count)
    longest_shard = math.ceil(len(source) / count)
    num_batches = math.ceil(longest_shard / batch_size)
    read = _ReadEvalBatch(source, preprocess, index, count, batch_size, int(read_threads))
    return _prefetch(grain.MapDataset.range(num_batches).map(read), num_workers)


# --- In-memory fast path ---------------------------------------------------------------------


def load_arrays(source: Sequence[Record], info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a whole split once into uint8 images (N, H, W, 3) and int32 labels (N,)."""
    if info.image_shape is None:
        raise ValueError(
            f'{info.name} has images of varied sizes; the in-memory path needs a fixed shape'
        )
    images = np.empty((len(source), *info.image_shape), np.uint8)
    labels = np.empty((len(source),), np.int32)
    for start in range(0, len(source), 2000):
        indices = range(start, min(start + 2000, len(source)))
        for i, record in zip(indices, _read_many(source, indices), strict=True):
            images[i], labels[i] = _check_record(record, info)
    return images, labels


_DEFAULT_CONTEXT = augment.Context()


def in_memory_indices(
    key: jax.Array, step: jax.Array, num_examples: int, batch_size: int
) -> jax.Array:
    """The examples of global batch `step` of the in-memory stream, a pure function of (key,
    step): epoch e visits the examples in a permutation drawn from fold_in(key, e), and the
    last partial batch of an epoch is dropped, as the host path does."""
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:  # shapes are static: this runs once, at trace time
        raise ValueError(f'batch_size {batch_size} exceeds the {num_examples} examples in memory')
    epoch, position = jnp.divmod(step, steps_per_epoch)
    permutation = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return jax.lax.dynamic_slice(permutation, (position * batch_size,), (batch_size,))


@functools.partial(jax.jit, static_argnames=('batch_size', 'num_examples', 'ops', 'ctx'))
def in_memory_train_batch(
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    step: jax.Array,
    *,
    batch_size: int,
    num_examples: int | None = None,
    ops: tuple[augment.Augmentation, ...] | None = None,
    ctx: augment.Context = _DEFAULT_CONTEXT,
) -> dict[str, jax.Array]:
    """Global batch `step` of the in-memory train stream: shuffled and augmented, uint8 as the
    host pipeline's batches (the train step normalises them).

    A pure function of (key, step) (`in_memory_indices`): resuming needs only the step, on any
    number of devices. The augmentation is the device versions of `ops` (default:
    `augment.pad_crop_flip_batch`), with the same distributions as the host's.

    Args:
      images, labels: the split, on the devices, whole on each or with its rows sharded over
        the mesh (`shard_rows`); rows from `num_examples` on are padding, never drawn (default:
        none). From sharded rows, XLA gathers a batch as a masked pick on each device and one
        all-reduce of the batch (tests/test_in_memory.py checks that the dataset itself never
        crosses between devices).
    """
    num_examples = images.shape[0] if num_examples is None else num_examples
    indices = in_memory_indices(key, step, num_examples, batch_size)
    images, labels = images[indices], labels[indices]
    augment_key = jax.random.fold_in(jax.random.fold_in(key, step), 1)
    if ops is None:
        images = augment.pad_crop_flip_batch(images, augment_key)
    else:
        images = augment.apply_device(ops, images, augment_key, ctx)
    return {'image': images, 'label': labels}


def shard_rows(array: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """`array` on the mesh's devices with its rows split over the data axis (padded with zero
    rows to a multiple of the device count); each process places only its devices' rows."""
    padding = -len(array) % mesh.devices.size
    if padding:
        array = np.concatenate([array, np.zeros((padding, *array.shape[1:]), array.dtype)])
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA_AXIS))
    return jax.make_array_from_callback(array.shape, rows, lambda index: array[index])


class InMemoryBatches:
    """The train stream of `dataset.in_memory`: the split decoded once and kept on the devices,
    its rows sharded over the mesh (CIFAR-10's 50k images are 150 MB, each of N devices holds
    150/N), every global batch drawn and augmented there by `in_memory_train_batch` from
    (seed, step), so nothing crosses from the host per step and a resumed run draws exactly
    what an uninterrupted one would, on any topology.
    """

    def __init__(self, source, info, preprocess, *, mesh, batch_size, seed, start_step):
        for op in preprocess.ops:
            if op.device is None:
                raise ValueError(
                    f'dataset.in_memory augments on the device, and augmentation {op.name!r} '
                    'has no device version; use the host pipeline (dataset.in_memory=False)'
                )
        images, labels = load_arrays(source, info)
        self._arrays = shard_rows(images, mesh), shard_rows(labels, mesh)
        self._key = jax.random.fold_in(jax.random.PRNGKey(seed), IN_MEMORY_STREAM)
        self._batch = jax.jit(
            functools.partial(
                in_memory_train_batch,
                batch_size=batch_size,
                num_examples=len(labels),
                ops=tuple(preprocess.ops),
                ctx=preprocess.ctx,
            ),
            out_shardings=sharding.batch_sharding(mesh),
        )
        self._step = start_step

    def __iter__(self) -> InMemoryBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        images, labels = self._arrays
        batch = self._batch(images, labels, self._key, self._step)
        self._step += 1
        return batch

    def close(self) -> None:
        pass


IN_MEMORY_STREAM = 7  # the in-memory stream's key: fold_in(PRNGKey(seed), 7)
