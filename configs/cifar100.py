"""The paper's CIFAR recipe applied to CIFAR-100 (prepare it with `tfds build cifar100`).

    python train.py --config=configs/cifar100.py:resnet56 --workdir=/tmp/c100 \
        --config.dataset.data_dir=DIR

Same schedule as configs/cifar10.py, 100 classes, per-channel statistics of CIFAR-100.
Expected: roughly 27-30% test error for resnet56-resnet110 (not in the paper; common
reproductions). Wall time as CIFAR-10.
"""

import ml_collections

from configs import cifar10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = cifar10.get_config(arg)
    c.unlock()
    c.dataset.name = 'cifar100'
    c.lock()
    return c
