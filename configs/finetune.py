"""Fine-tuning converted weights on another dataset: a recipe that works as given.

    python train.py --config=configs/finetune.py:resnet50 --workdir=/tmp/finetune \
        --config.init_from=resnet50-0676ba61.pth            # torchvision's ImageNet weights

    python train.py --config=configs/finetune.py:resnet20 --workdir=/tmp/finetune20 \
        --config.init_from=../shared/models/akamaster_cifar10/resnet20.safetensors

    python train.py --config=configs/finetune.py:resnet18,folder --workdir=/tmp/photos \
        --config.dataset.data_dir=~/photos --config.init_from=resnet18-f37072fd.pth

Arg: the network (default resnet18): an ImageNet net (torchvision's layout, so the bottleneck
strides on its 3x3, v1.5) or a CIFAR net (the PyTorch CIFAR layout); with ',folder', the data
is a folder of your own images (resnet_jax.folder: one sub-folder per class, or train/ and val/
holding them), else the shared CIFAR-10 copy.

What it does, as fine-tuning recipes usually do (torchvision's and timm's references): the head
is re-initialised for the new classes (init_from logs it), the stem and the first stage stay
frozen (`optimizer.frozen`), the rest of the backbone learns at a tenth of the head's rate
(`optimizer.backbone_lr_multiplier`), BatchNorm keeps the statistics it was trained with
(`model.freeze_bn`: batches of 64 estimate them worse than the pretraining did), momentum SGD
with a cosine schedule and a short warm-up, no weight decay on BatchNorm and biases, and the
input normalisation torchvision-style trainers use (`imagenet`).

Expected: the loss falls from the first steps; the test error depends on the weights and the
data. Hardware: resnet18 at 32x32 takes about 0.2 s a step at batch 64 on the 2-core CPU here.
"""

import ml_collections

from resnet_jax import config as config_lib
from resnet_jax import models


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name, _, data = (arg or 'resnet18').partition(',')
    if data not in ('', 'folder'):
        raise ValueError(f"configs/finetune.py: unknown data {data!r}; expected 'folder' or none")
    if name not in models.MODELS:
        raise ValueError(
            f'configs/finetune.py: unknown model {name!r}; expected one of {tuple(models.MODELS)}'
        )
    c = config_lib.base_config()
    c.model.name = name
    c.model.freeze_bn = True
    if models.family(name) == 'imagenet':
        c.model.stride_on = '3x3'  # torchvision's v1.5 layout
    c.dataset.name = 'cifar10_jpeg'
    if data == 'folder':
        c.dataset.name = 'folder'
        c.dataset.data_dir = ''  # yours: --config.dataset.data_dir=DIR
        c.dataset.train_split, c.dataset.eval_split, c.dataset.test_split = 'train', 'val', ''
    c.dataset.normalization = 'imagenet'
    c.dataset.in_memory = data != 'folder'  # CIFAR on the devices; photographs vary in size
    c.batch_size = 64
    c.total_steps = 2_000
    c.optimizer.name = 'momentum'
    c.optimizer.learning_rate = 0.01
    c.optimizer.schedule = 'cosine'
    c.optimizer.warmup_steps = 100
    c.optimizer.warmup_mode = 'linear'
    c.optimizer.warmup_learning_rate = 0.0
    c.optimizer.weight_decay = 1e-4
    c.optimizer.decay_bn_and_bias = False
    c.optimizer.frozen = ('^stem', '^stage1/')  # parameter paths, e.g. stage1/block1/conv1
    c.optimizer.backbone_lr_multiplier = 0.1
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.lock()
    return c
