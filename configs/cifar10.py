"""The paper's CIFAR-10 recipe (section 4.2) for any CIFAR net.

    python train.py --config=configs/cifar10.py:resnet20 --workdir=/tmp/resnet20

Batch 128, SGD momentum 0.9, weight decay 1e-4 (L2), learning rate 0.1 divided by 10 at 32k
and 48k iterations, stop at 64k; model selection on the 45k/5k split, final number on test.
ResNet-110 and deeper (and plain110) warm up at 0.01 for 400 iterations, as the paper did.
Arg: any CIFAR model name (resnet20..resnet1202, plain20..plain110).

Input: the train split is decoded once and kept on the devices, and every batch is drawn and
augmented there (`dataset.in_memory`): on the 2-core CPU here the trainer ran 1.11-1.13x the
images/s of the host pipeline (`benchmarks/cifar_loop.py`, BENCHMARKS.md); on an accelerator
nothing crosses from the host per step. `--config.dataset.in_memory=False` takes the host
pipeline (a data stream of its own: a run is resumed with the value it started with).

Expected: test error about 8.75% (resnet20) to 6.4% (resnet110) on the original CIFAR-10; a
little higher on the shared JPEG copy. Hardware and wall time: about 1.6 s per step on the
2-core CPU here (resnet20, so ~28 h for 64k steps); minutes on one GPU.
"""

import ml_collections

from resnet_jax import config as config_lib
from resnet_jax import models

PAPER_BATCH = 128
DEEP = {'resnet110', 'resnet1202', 'plain110'}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or 'resnet20'
    if name not in models.CIFAR_MODELS:
        raise ValueError(
            f'configs/cifar10.py: unknown model {name!r}; expected one of {models.CIFAR_MODELS}'
        )
    c = config_lib.base_config()
    c.model.name = name
    c.dataset.name = 'cifar10_jpeg'  # the shared copy; 'cifar10' once prepared with tfds build
    c.dataset.in_memory = True
    c.batch_size = PAPER_BATCH
    c.optimizer.learning_rate = 0.1 * c.batch_size / PAPER_BATCH
    c.total_steps = 64_000
    c.optimizer.boundaries = (32_000, 48_000)
    if name in DEEP:
        c.optimizer.warmup_steps = 400
        c.optimizer.warmup_mode = 'constant'
        c.optimizer.warmup_learning_rate = 0.01
    c.model.scan_blocks = name in DEEP  # compile in seconds; identical outputs
    c.lock()
    return c
