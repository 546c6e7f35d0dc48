"""The datasets this project trains on, described as data: one `DatasetSpec` each.

A spec says what the pipeline must know about a dataset that its files do not: which family of
network and recipe it is for, its channel statistics, the augmentation it trains with by
default, how its eval images are prepared, and how to prepare it. Everything else (classes,
splits, sizes) is read from the prepared TFDS directory. A new dataset is one
`register_dataset(DatasetSpec(...))` call (docs/extending.md).
"""

from __future__ import annotations

import dataclasses

FAMILIES = ('cifar', 'imagenet')
SOURCES = ('tfds', 'folder')


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline needs to know about a dataset beyond its files.

    Attributes:
      name: the TFDS name (`dataset.name`).
      family: 'cifar': small images of one fixed size, for the CIFAR nets and section 4.2's
        recipe; 'imagenet': photographs of any size, cropped to 224 for the ImageNet nets.
      mean, std: per-channel statistics of the train split on the 0..255 scale
        (`dataset.normalization='channel'`).
      augmentation: the train augmentation by default (`dataset.augmentation='default'`): a
        '+'-joined chain of names in `resnet_jax.augment.AUGMENTATIONS`.
      eval_preprocessing: what eval images get (a chain of the same names, '' for none).
      prepare: what to do before `tfds build` (manual downloads), shown when it is missing.
      source: 'tfds', a prepared TFDS directory under `dataset.data_dir`; 'folder', a folder of
        class sub-folders of images (resnet_jax.folder).
    """

    name: str
    family: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augmentation: str
    eval_preprocessing: str = ''
    prepare: str = ''
    source: str = 'tfds'

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f'{self.name}: family {self.family!r}; expected one of {FAMILIES}')
        if self.source not in SOURCES:
            raise ValueError(f'{self.name}: source {self.source!r}; expected one of {SOURCES}')


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Makes `spec.name` a value of `dataset.name`."""
    DATASETS[spec.name] = spec
    return spec


def spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset (a version suffix such as ':3.0.2' is ignored).

    Raises:
      ValueError: naming the registered datasets and where to add one.
    """
    base = name.split(':')[0] if isinstance(name, str) else name
    if base not in DATASETS:
        raise ValueError(
            f'unknown dataset {name!r}: expected one of {", ".join(DATASETS)} (a new one is one '
            'register_dataset call, see docs/extending.md)'
        )
    return DATASETS[base]


# Channel statistics on the 0..255 scale.
CIFAR10_MEAN = (125.31, 122.95, 113.87)  # 0.4914, 0.4822, 0.4465
CIFAR10_STD = (62.99, 62.09, 66.70)  # 0.2470, 0.2435, 0.2616
CIFAR100_MEAN = (129.30, 124.07, 112.43)  # 0.5071, 0.4865, 0.4409
CIFAR100_STD = (68.17, 65.39, 70.42)  # 0.2673, 0.2564, 0.2762
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0.485, 0.456, 0.406
IMAGENET_STD = (58.395, 57.12, 57.375)  # 0.229, 0.224, 0.225
SVHN_MEAN = (111.61, 113.16, 120.57)  # 0.4377, 0.4438, 0.4728
SVHN_STD = (50.50, 51.26, 50.24)  # 0.1980, 0.2010, 0.1970

for _name in ('cifar10', 'cifar10_jpeg'):
    register_dataset(DatasetSpec(_name, 'cifar', CIFAR10_MEAN, CIFAR10_STD, 'pad_crop_flip'))
register_dataset(DatasetSpec('cifar100', 'cifar', CIFAR100_MEAN, CIFAR100_STD, 'pad_crop_flip'))
register_dataset(
    DatasetSpec(
        'imagenet2012',
        'imagenet',
        IMAGENET_MEAN,
        IMAGENET_STD,
        augmentation='scale_crop_flip',
        eval_preprocessing='resize_center_crop',
        prepare=(
            'download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org '
            'into {data_dir}/downloads/manual'
        ),
    )
)
# Street-view house numbers, 32x32: docs/extending.md's example of a dataset added as data.
# Digits are not mirror-symmetric, so its default augmentation crops without flipping.
register_dataset(DatasetSpec('svhn_cropped', 'cifar', SVHN_MEAN, SVHN_STD, 'pad_crop'))
# Your own photographs (resnet_jax.folder): ImageNet-style crops at 224, and ImageNet's
# statistics, which the pretrained weights they are usually fine-tuned from expect.
register_dataset(
    DatasetSpec(
        'folder',
        'imagenet',
        IMAGENET_MEAN,
        IMAGENET_STD,
        augmentation='inception_crop_flip',
        eval_preprocessing='resize_center_crop',
        source='folder',
    )
)
