"""Your own images as a dataset: `dataset.name='folder'`, `dataset.data_dir=ROOT`.

ROOT holds one sub-folder per class, named after it, with the images (JPEG, PNG, BMP, WebP;
grayscale and RGBA are made RGB) inside, in either layout:

    ROOT/train/CLASS/*.jpg  and  ROOT/val/CLASS/*.jpg     splits as given
    ROOT/CLASS/*.jpg                                       'val' is a held-out fraction

A class folder is read recursively, as torchvision's ImageFolder reads it: images in folders
inside it (CLASS/2023/a.jpg) belong to the class too. Its files come in a fixed order: its own,
sorted, then each sub-folder's, in sorted order; hidden files and folders are skipped.

In the second layout an image belongs to 'val' when a hash of its path inside its class folder
(CLASS/2023/a.jpg) falls below `VAL_FRACTION`: the split never depends on the order files are
listed in, and adding images never moves old ones between splits. Classes are the sorted
sub-folder names; the run records them (`class_names.json` in the workdir) and refuses to resume
on a folder whose classes changed, since the labels would silently mean other classes.

Reading needs no TensorFlow: the folder is listed once (file names and the first bytes of each
file, so a stray non-image stops the run before it starts, naming the file), and images are
decoded by OpenCV as Grain asks for them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence

import numpy as np

from resnet_jax import decode, paths

NAME = 'folder'
SPLITS = ('train', 'val')
VAL_FRACTION = 0.1
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
# The first bytes of each format, so a file that is not an image is named at the start.
_SIGNATURES = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'BM', b'RIFF')

Record = dict


def read_image(path: str) -> np.ndarray:
    """An image file as uint8 RGB (height, width, 3); grayscale and RGBA become RGB.

    Raises:
      ValueError: naming the file if it does not exist, is a directory or is not a readable
        image.
    """
    if paths.isdir(path):
        raise ValueError(f'image {path!r} is a directory; expected an image file')
    if not paths.isfile(path):
        raise ValueError(f'image {path!r} does not exist')
    with paths.open_file(path, 'rb') as f:
        return decode_image(f.read(), path)


def decode_image(encoded: bytes, path: str) -> np.ndarray:
    return decode.EncodedImage(encoded, f'image {path!r}').decode()


def read_encoded_image(path: str) -> decode.EncodedImage:
    """An image file's bytes, decoded later by whoever needs its pixels (`resnet_jax.decode`)."""
    with paths.open_file(path, 'rb') as f:
        return decode.EncodedImage(f.read(), f'image {path!r}')


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """The classes of a folder dataset and the (path, label) pairs of each split."""

    root: str
    class_names: tuple[str, ...]
    splits: dict[str, tuple[tuple[str, int], ...]]


def _subfolders(directory: str) -> list[str]:
    return sorted(
        name
        for name in paths.listdir(directory)
        if not name.startswith('.') and paths.isdir(paths.join(directory, name))
    )


def _images_of(class_dir: str) -> list[str]:
    """The image files of one class folder and of the folders inside it, in a fixed order.

    Raises:
      ValueError: naming a file that is not an image, or a class folder without images.
    """
    files = list(_images_below(class_dir, set()))
    if not files:
        raise ValueError(f'class folder {class_dir!r} holds no images; add some or remove it')
    return files


def _images_below(directory: str, seen: set[str]) -> Iterator[str]:
    """`directory`'s own images (sorted), then each sub-folder's; hidden names skipped.

    Folders are followed through symbolic links, as ImageFolder does, each real folder once
    (a link back up would otherwise list the same images forever).
    """
    real = os.path.realpath(directory)
    if real in seen:
        return
    seen.add(real)
    names = [name for name in paths.listdir(directory) if not name.startswith('.')]
    folders = [name for name in names if paths.isdir(paths.join(directory, name))]
    for name in names:
        if name not in folders:
            yield _checked_image(paths.join(directory, name))
    for name in folders:
        yield from _images_below(paths.join(directory, name), seen)


def _checked_image(path: str) -> str:
    """`path`, once its name and first bytes show an image. Raises ValueError naming it."""
    if not path.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(
            f'{path!r} is not an image; a class folder holds only images '
            f'({", ".join(IMAGE_SUFFIXES)}): move it out'
        )
    with paths.open_file(path, 'rb') as f:
        head = f.read(16)
    if not head.startswith(_SIGNATURES):
        raise ValueError(
            f"{path!r} is not a readable image (its first bytes are no image format's); "
            'replace or remove it'
        )
    return path


def _classes(directory: str, what: str) -> list[str]:
    classes = _subfolders(directory)
    if len(classes) < 2:
        raise ValueError(
            f'{what} {directory!r} has {len(classes)} class folder(s) ({", ".join(classes)}); '
            'expected one sub-folder per class, at least two'
        )
    return classes


def in_val(relative_path: str) -> bool:
    """Whether an image of the single-folder layout is held out (a hash of its path)."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], 'big') / 2**64 < VAL_FRACTION


def scan(root: str) -> FolderIndex:
    """Lists a folder dataset.

    Raises:
      ValueError: one line naming what is wrong: a missing root, fewer than two classes, an
        empty class folder, a file that is not an image, val classes that train lacks.
    """
    if not str(root):
        raise ValueError(
            'the folder dataset needs dataset.data_dir: the folder of your class sub-folders '
            '(--config.dataset.data_dir=DIR)'
        )
    if paths.is_url(root):
        raise ValueError(
            f'folder dataset {root!r} is a cloud storage URL; the input pipeline reads local '
            'files: copy the folder to local disk or mount the bucket, and pass that path'
        )
    root = paths.normalize(root)
    if not paths.isdir(root):
        raise ValueError(
            f'folder dataset {root!r} does not exist; expected dataset.data_dir to be a folder '
            'of class sub-folders (or of train/ and val/ with class sub-folders)'
        )
    if paths.isdir(paths.join(root, 'train')):
        classes = _classes(paths.join(root, 'train'), 'train folder')
        labels = {name: i for i, name in enumerate(classes)}
        splits = {}
        for split in SPLITS:
            directory = paths.join(root, split)
            if not paths.isdir(directory):
                raise ValueError(
                    f'folder dataset {root!r} has train/ but no {split}/; expected both, or '
                    'class folders directly in it (val then held out)'
                )
            unknown = sorted(set(_subfolders(directory)) - set(labels))
            if unknown:
                raise ValueError(
                    f'{directory!r} has class folder(s) {", ".join(unknown)} that train/ lacks'
                )
            splits[split] = tuple(
                (path, labels[name])
                for name in _subfolders(directory)
                for path in _images_of(paths.join(directory, name))
            )
        return FolderIndex(root, tuple(classes), splits)
    classes = _classes(root, 'folder dataset')
    train, val = [], []
    for label, name in enumerate(classes):
        class_dir = paths.join(root, name)
        for path in _images_of(class_dir):
            # The path inside the class folder: a top-level image keeps the hash it always had.
            inside = os.path.relpath(path, class_dir).replace(os.sep, '/')
            (val if in_val(f'{name}/{inside}') else train).append((path, label))
    if not val:
        raise ValueError(
            f'folder dataset {root!r} is too small to hold {VAL_FRACTION:.0%} of it out for '
            'validation; add images, or give it train/ and val/ sub-folders'
        )
    return FolderIndex(root, tuple(classes), {'train': tuple(train), 'val': tuple(val)})


class FolderSource(Sequence):
    """Random access to one split's records, {'image': uint8 RGB, 'label': int, 'id': path},
    decoded when read (Grain reads them in its workers)."""

    def __init__(self, examples: Sequence[tuple[str, int]]):
        self._examples = tuple(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> Record:
        path, label = self._examples[index]
        return {'image': read_image(path), 'label': label, 'id': path}

    def read_encoded(self, indices: Sequence[int]) -> list[Record]:
        """The records at `indices` with their images undecoded (the input pipeline's read)."""
        examples = [self._examples[i] for i in indices]
        return [{'image': read_encoded_image(p), 'label': c, 'id': p} for p, c in examples]


def open_split(split: str, root: str) -> tuple[FolderSource, FolderIndex]:
    """The source of `split` ('train' or 'val') and the folder's index.

    Raises:
      ValueError: for another split name, or what `scan` finds wrong.
    """
    if split not in SPLITS:
        raise ValueError(
            f'the folder dataset has splits {", ".join(SPLITS)}; asked for {split!r} (set '
            "dataset.train_split='train', dataset.eval_split='val', dataset.test_split='')"
        )
    index = scan(root)
    return FolderSource(index.splits[split]), index
