"""What the examples are: a prepared TFDS dataset's splits (read through `tfds.data_source`,
TensorFlow never imported), the paper's CIFAR holdout on top of them, and image folders
(resnet_jax.folder), each as a random-access source of records, with the dataset's info.

* `open_split(name, split, data_dir)` returns a source over any TFDS split string
  ('test[:1000]', 'train[:10%]+test'), or the paper's `train_45k` / `val_5k` holdout, or for
  `dataset.name='folder'` a folder of class sub-folders; and the `DatasetInfo`.
* Damaged dataset files stop the run when the split is opened (small datasets are read through
  once) or name the file and record when read.

Records are dicts: `image` (encoded bytes as `decode.EncodedImage` from `read_encoded`, or
decoded uint8 (H, W, 3)), `label` int. resnet_jax.preprocess turns one into network input.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from resnet_jax import datasets, decode, folder

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


def check_data_dir(data_dir: str) -> str:
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

    data_dir = check_data_dir(data_dir)
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
        return read_many(self._source, [int(self._indices[i]) for i in indices])

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
    data_dir = check_data_dir(data_dir)
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
            records = read_many(self._source, indices)
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
    return reader(list(indices)) if reader else read_many(source, indices)


def read_many(source: Sequence, indices: Sequence[int]) -> list[Record]:
    getitems = getattr(source, '__getitems__', None)
    return getitems(list(indices)) if getitems else [source[i] for i in indices]
