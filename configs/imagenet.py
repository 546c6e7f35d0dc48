"""ImageNet (ILSVRC-2012) for resnet18..152 and plain18/34: the paper's recipe or a modern one.

    python train.py --config=configs/imagenet.py:resnet50 --workdir=DIR \
        --config.dataset.data_dir=TFDS_DIR            # the paper's recipe
    python train.py --config=configs/imagenet.py:resnet50,modern --workdir=DIR ...
    python train.py --config=configs/imagenet.py:resnet50,modern,tpu ...   # a pod: TPU or stop
    python train.py --config=configs/imagenet.py:resnet50,modern,gpu ...   # GPUs or stop

Paper (section 3.4): batch 256, SGD momentum 0.9, weight decay 1e-4, learning rate 0.1 divided
by 10 when the error plateaus (at about 150k and 300k iterations in Figure 4), 60e4 iterations,
scale augmentation [256, 480] with per-pixel mean subtraction; top-1 error on the 50k
validation images (single 224 centre crop: about 24.7% for ResNet-50 in later reports; the
paper's 10-crop figures are lower).
Every expected number here is single-crop, what the run's eval and `python -m resnet_jax
evaluate --workdir=DIR` report; the paper's own protocols are `evaluate --crops=10`
(10-crop testing, its Table 3: 22.85% top-1 for ResNet-50) and `evaluate
--scales=224,256,384,480,640` (fully-convolutional at five scales, its Table 4: 20.74%), both
lower than single-crop (docs/training.md, "The paper's test protocol").
Modern: lr = 0.1 x batch / 256, 5 warm-up epochs then cosine to 0 over 90 epochs, label
smoothing 0.1, Inception crops, per-channel normalisation, bfloat16 compute, stride on the 3x3
(v1.5), zero-init residual, no weight decay on BN and biases: about 76.5-77% top-1 for ResNet-50
as published without mixing; on top, mixup 0.1 and CutMix 1.0 on the device as in timm's
"ResNet strikes back" recipes, which pay off most on longer schedules (--config.mixup_alpha=0
--config.cutmix_alpha=0 drops them).
Hardware: a TPU pod slice or 8 GPUs; the global batch is the only thing to change for more
(the learning rate follows it). `,tpu` or `,gpu` sets `require_backend`: a run that JAX would
start on the CPU instead (a CUDA plugin that did not load) stops at once with one line.
Wall time: not measured yet (no accelerator and no ImageNet on the machines this was written
on); BENCHMARKS.md will carry the per-step time. Prepare the
data once with `tfds build imagenet2012 --file_format=array_record --data_dir=TFDS_DIR` after
placing the manual-download tars.
"""

import ml_collections

from resnet_jax import config as config_lib
from resnet_jax import models

TRAIN_IMAGES = 1_281_167
PAPER_BATCH = 256
RECIPES = ('paper', 'modern')
ACCELERATORS = ('gpu', 'tpu')  # the run stops unless JAX runs on it (config.require_backend)


def _parse(arg: str | None) -> tuple[str, str, str]:
    """'NAME[,paper|modern][,gpu|tpu]' -> (name, recipe, accelerator)."""
    name, *parts = (arg or 'resnet50').split(',')
    if name not in models.IMAGENET_MODELS:
        raise ValueError(
            f'configs/imagenet.py: unknown model {name!r}; expected one of {models.IMAGENET_MODELS}'
        )
    recipe = accelerator = ''
    for part in parts:
        if part in RECIPES and not recipe:
            recipe = part
        elif part in ACCELERATORS and not accelerator:
            accelerator = part
        elif part:
            raise ValueError(
                f'configs/imagenet.py: unknown or repeated part {part!r} of {arg!r}; expected '
                'NAME[,paper|modern][,gpu|tpu]'
            )
    return name, recipe, accelerator


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name, recipe, accelerator = _parse(arg)
    c = config_lib.base_config()
    c.model.name = name
    c.require_backend = accelerator
    c.dataset.name = 'imagenet2012'
    c.dataset.train_split = 'train'
    c.dataset.eval_split = 'validation'
    c.dataset.test_split = ''
    c.dataset.num_workers = 8
    c.batch_size = PAPER_BATCH
    # BatchNorm statistics over spans of 32 images, as the paper's 8 GPUs x 32 (and MLPerf's
    # "BN span"): a span inside one device needs no communication, where global statistics
    # put two all-reduces per BatchNorm layer into every step, latency-bound across hosts.
    c.bn_group_size = 32
    c.eval_batch_size = 512
    c.log_every_steps = 100
    c.eval_every_steps = 10_000
    c.checkpoint_every_steps = 5_000
    c.optimizer.learning_rate = 0.1 * c.batch_size / PAPER_BATCH
    if recipe == 'modern':
        # mixup 0.1 and CutMix 1.0, half the examples each (timm's "ResNet strikes back" A3).
        c.mixup_alpha = 0.1
        c.cutmix_alpha = 1.0
        steps_per_epoch = TRAIN_IMAGES // c.batch_size
        c.total_steps = 90 * steps_per_epoch
        c.dtype = 'bfloat16'
        c.label_smoothing = 0.1
        c.model.stride_on = '3x3'
        c.model.zero_init_residual = not name.startswith('plain')
        c.dataset.augmentation = 'inception_crop_flip'
        c.dataset.normalization = 'channel'
        c.optimizer.schedule = 'cosine'
        c.optimizer.boundaries = ()
        c.optimizer.warmup_steps = 5 * steps_per_epoch
        c.optimizer.warmup_mode = 'linear'
        c.optimizer.warmup_learning_rate = 0.0
        c.optimizer.decay_bn_and_bias = False
    else:
        c.total_steps = 600_000
        c.optimizer.boundaries = (150_000, 300_000)
    c.lock()
    return c
