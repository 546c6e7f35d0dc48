"""The networks of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016).

This module owns the network (`ResNet`, built of resnet_jax.layers), the registry of named
presets and the pure helpers that initialise and apply them. It does no I/O, reads no config
objects and knows nothing of sharding: the trainer decides where arrays live.

Two families, as in the paper:

* ImageNet (Table 1): a 7x7/2 stem and a 3x3/2 max-pool, four stages of basic (18/34) or
  bottleneck (50/101/152) blocks at widths 64..512, global average pooling, a dense head.
* CIFAR (section 4.2): a 3x3 stem with 16 filters, three stages of n basic blocks at widths
  16/32/64 on 32/16/8-pixel maps (6n+2 weighted layers), global average pooling, a dense head.

"plain" nets are the same stacks with the shortcut removed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax import options as opt
from resnet_jax import xla_cpu
from resnet_jax.layers import SHORTCUTS, STEMS, BasicBlock, Bottleneck, Stage

ModuleDef = Any
Variables = dict[str, Any]

# He et al. 2015 ("Delving deep into rectifiers"), the initialisation the paper cites [13];
# fan_out as in torchvision and the paper's Caffe models.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class ResNet(nn.Module):
    """A residual (or plain) network of the paper.

    Use `create_model(name, ...)` rather than building this directly: the presets fix the stage
    sizes and pick the family's defaults. The fields declared with `opt` are the options
    `create_model` accepts (`OPTIONS`); the experiment config's `model` section is derived from
    them (resnet_jax.config), so a new option is one field here.

    Attributes:
      stage_sizes: blocks per stage.
      block_cls: `BasicBlock` or `Bottleneck` (or any block with their signature).
      num_classes: width of the dense head.
      widths: the width of each stage (of the 3x3 convolutions in bottlenecks); the stem's is
        the first.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = opt.one_of(
        'imagenet',
        STEMS,
        'a registered stem (models.STEMS)',
        "the layers before the first stage: 'imagenet' (7x7/2 conv, 3x3/2 max-pool), 'cifar' "
        "(3x3 conv), 'deep' (three 3x3 convs, then the max-pool: ResNet-C/D)",
        preset_default=True,
    )
    shortcut: str | None = opt.one_of(
        'B',
        SHORTCUTS,
        'a registered shortcut (models.SHORTCUTS)',
        'A: identity, zero-padded channels and strided subsampling, no parameters; B: 1x1 '
        'projection only where the shape changes; C: projection on every block; D: 2x2 average '
        'pool, then the projection at stride 1 (ResNet-D). Plain nets have none',
        preset_default=True,
    )
    stride_on: str = opt.one_of(
        '1x1',
        ('1x1', '3x3'),
        "'1x1' or '3x3'",
        'where a bottleneck strides: the paper and Keras (1x1, v1) or torchvision and NVIDIA '
        '(3x3, v1.5)',
    )
    zero_init_residual: bool = opt.flag('the last BN scale of every residual branch starts at 0')
    dtype: Any = opt.option(
        jnp.float32,
        opt.is_float_dtype,
        'a floating dtype such as jnp.bfloat16',
        'compute dtype; parameters, BN statistics and logits stay float32 (config: `dtype`)',
        in_config=False,
    )
    bn_momentum: float = opt.option(
        0.9,
        lambda v: opt.is_number(v) and 0.0 <= v < 1.0,
        'a number in [0, 1)',
        "BatchNorm running-average decay (0.9 is PyTorch's momentum 0.1)",
    )
    bn_epsilon: float = opt.option(
        1e-5,
        lambda v: opt.is_number(v) and 0.0 < v < float('inf'),  # inf: every BN output 0
        'a finite positive number',
        'added to the BatchNorm variance (torchvision 1e-5, Keras 1.001e-5)',
    )
    scan_blocks: bool = opt.flag(
        'blocks 2..n of each stage run through `nn.scan`: deep nets compile in seconds'
    )
    freeze_bn: bool = opt.flag(
        'BatchNorm normalises with its running statistics in training too and never updates '
        'them (fine-tuning on small batches)'
    )
    remat: bool = opt.flag(
        "each block's activations are recomputed in the backward pass instead of kept: less "
        'memory for large batches for about a third more compute, the same numbers (on the '
        'CPU backend only with scan_blocks: BENCHMARKS.md)'
    )
    input_channels: int = opt.option(
        3,
        lambda v: opt.is_int(v) and v > 0,
        'a positive int',
        'channels the images must have',
        in_config=False,
    )

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        check_images(images, self.input_channels)
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init, padding='VALID'
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train or self.freeze_bn,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
        )
        last_norm = norm
        if self.zero_init_residual:
            last_norm = functools.partial(norm, scale_init=nn.initializers.zeros)
        # nn.remat keeps only each block's input for the backward pass (jax.checkpoint).
        block_cls = nn.remat(self.block_cls) if self.remat else self.block_cls
        block = functools.partial(
            block_cls,
            conv=conv,
            norm=norm,
            last_norm=last_norm,
            shortcut=self.shortcut,
            stride_on=self.stride_on,
        )

        # Same parameters and outputs; on XLA's CPU backend only, the scanned blocks' gradient
        # convolutions are written out in the form it runs fast inside loops (xla_cpu).
        loop_conv = xla_cpu.loop_conv(conv) if self.scan_blocks else None
        loop_block = functools.partial(block, conv=loop_conv) if loop_conv else None

        x = STEMS[self.stem](images.astype(self.dtype), conv, norm, self.widths[0])
        for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            x = Stage(
                block,
                width,
                num_blocks,
                strides=1 if i == 0 else 2,
                scan_blocks=self.scan_blocks,
                loop_block=loop_block,
                name=f'stage{i + 1}',
            )(x)
        # Pool and classify in float32 at least (bfloat16 logits lose the softmax's tail), and
        # in float64 when the whole model computes in it (exact-equality tests).
        head_dtype = jnp.promote_types(self.dtype, jnp.float32)
        x = jnp.mean(x.astype(head_dtype), axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=head_dtype, name='head')(x)


OPTIONS: dict[str, opt.Option] = {
    f.name: f.metadata['option'] for f in dataclasses.fields(ResNet) if 'option' in f.metadata
}
OPTION_NAMES: tuple[str, ...] = tuple(OPTIONS)


def option_defaults() -> dict[str, Any]:
    """The config's `model` fields and their defaults ('' = the preset's own value)."""
    fields = {f.name: f.default for f in dataclasses.fields(ResNet)}
    return {
        name: '' if option.preset_default else fields[name]
        for name, option in OPTIONS.items()
        if option.in_config
    }


def check_images(images: Any, channels: int) -> None:
    """Raises ValueError unless `images` is a floating (N, H, W, channels) batch.

    Shapes and dtypes are static under `jit`, so this costs nothing at run time.
    """
    shape = getattr(images, 'shape', None)
    dtype = getattr(images, 'dtype', None)
    if shape is None or dtype is None:
        raise ValueError(f'images must be an array, got {type(images).__name__}')
    if len(shape) != 4:
        raise ValueError(
            f'images must have rank 4 (batch, height, width, channels), got shape {tuple(shape)}'
        )
    if shape[-1] != channels:
        raise ValueError(
            f'images must have {channels} channels in the last axis (NHWC), got shape '
            f'{tuple(shape)}'
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f'images must be floating point (normalise uint8 pixels first), got dtype {dtype}'
        )


# --- The networks ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named network: its family ('imagenet' or 'cifar': image size, recipe) and fields."""

    family: str
    fields: dict[str, Any]


MODELS: dict[str, Preset] = {}
_CIFAR_WIDTHS = (16, 32, 64)


def register_model(name: str, *, family: str, **fields: Any) -> None:
    """Adds a network to `create_model`: `fields` are ResNet's (stage_sizes, block_cls, options).

    Raises:
      ValueError: if `name` is taken or a field is not one of ResNet's.
    """
    if name in MODELS:
        raise ValueError(f'model {name!r} is already registered')
    known = {f.name for f in dataclasses.fields(ResNet)} - {'num_classes', 'parent', 'name'}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f'register_model({name!r}): {unknown} are not ResNet fields')
    MODELS[name] = Preset(family, dict(fields))


def _imagenet(name: str, stages: Sequence[int], block: ModuleDef, **fields: Any) -> None:
    plain = name.startswith('plain')
    shortcut = None if plain else fields.pop('shortcut', 'B')
    register_model(
        name,
        family='imagenet',
        stage_sizes=tuple(stages),
        block_cls=block,
        shortcut=shortcut,
        **fields,
    )


def _cifar(n: int, plain: bool = False) -> None:
    register_model(
        f'{"plain" if plain else "resnet"}{6 * n + 2}',
        family='cifar',
        stage_sizes=(n, n, n),
        block_cls=BasicBlock,
        stem='cifar',
        widths=_CIFAR_WIDTHS,
        shortcut=None if plain else 'A',
    )


for _name, _stages, _block in (
    ('resnet18', (2, 2, 2, 2), BasicBlock),
    ('resnet34', (3, 4, 6, 3), BasicBlock),
    ('resnet50', (3, 4, 6, 3), Bottleneck),
    ('resnet101', (3, 4, 23, 3), Bottleneck),
    ('resnet152', (3, 8, 36, 3), Bottleneck),
    ('plain18', (2, 2, 2, 2), BasicBlock),
    ('plain34', (3, 4, 6, 3), BasicBlock),
):
    _imagenet(_name, _stages, _block)
for _n in (3, 5, 7, 9, 18, 200):
    _cifar(_n)
for _n in (3, 5, 7, 9, 18):
    _cifar(_n, plain=True)
# ResNet-D ("Bag of Tricks", He et al. 2019): the deep stem, average-pool shortcuts and the
# stride on the 3x3 of a bottleneck. docs/extending.md walks through this addition.
for _name, _stages in (('resnet50d', (3, 4, 6, 3)), ('resnet101d', (3, 4, 23, 3))):
    _imagenet(_name, _stages, Bottleneck, stem='deep', shortcut='D', stride_on='3x3')

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
IMAGENET_MODELS: tuple[str, ...] = tuple(n for n, p in MODELS.items() if p.family == 'imagenet')
CIFAR_MODELS: tuple[str, ...] = tuple(n for n, p in MODELS.items() if p.family == 'cifar')


def family(name: str) -> str:
    """'imagenet' or 'cifar' (or a registered family): which images and recipe the net is for."""
    return _preset(name).family


def _preset(name: str) -> Preset:
    if name not in MODELS:
        raise ValueError(f'unknown model name {name!r}; expected one of {", ".join(MODELS)}')
    return MODELS[name]


def create_model(name: str, *, num_classes: int, **options: Any) -> ResNet:
    """Builds the named network of the paper.

    Args:
      name: one of `MODEL_NAMES` (or a network added with `register_model`).
      num_classes: width of the dense head (1000 for ImageNet, 10 for CIFAR-10).
      **options: any of `OPTION_NAMES` (`OPTIONS` says what each takes): shortcut
        ('A'|'B'|'C'|'D'; CIFAR nets default to 'A' and ImageNet nets to 'B'), stem, stride_on
        ('1x1'|'3x3'), zero_init_residual, dtype, bn_momentum, bn_epsilon, scan_blocks,
        input_channels.

    Raises:
      ValueError: for an unknown name or option, a value of the wrong kind, or an option that
        makes no sense for the net (a shortcut or zero-init residual on a plain net).
    """
    preset = _preset(name)
    if not opt.is_int(num_classes) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
    for key, value in options.items():
        if key not in OPTIONS:
            raise ValueError(
                f'unknown option {key!r} for create_model; '
                f'expected one of {", ".join(OPTION_NAMES)}'
            )
        if not OPTIONS[key].check(value):
            raise ValueError(f'option {key}={value!r} is invalid; expected {OPTIONS[key].expected}')
    fields = dict(preset.fields)
    plain = fields.get('shortcut', 'B') is None
    if plain and 'shortcut' in options:
        raise ValueError(
            f'{name} is a plain net and has no shortcut; got shortcut={options["shortcut"]!r}'
        )
    if plain and options.get('zero_init_residual'):
        raise ValueError(
            f'{name} is a plain net: zero_init_residual=True would zero its only path; '
            'expected zero_init_residual=False'
        )
    fields.update(options)
    if 'dtype' in options:
        fields['dtype'] = jnp.dtype(options['dtype'])
    return ResNet(num_classes=num_classes, **fields)


# --- Pure helpers on a model ----------------------------------------------------------------


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(opt.is_int(d) and d > 0 for d in shape):
        raise ValueError(
            f'image_shape must be (height, width, channels) of positive ints, got {image_shape!r}'
        )
    return shape  # type: ignore[return-value]


def init_variables(model: ResNet, rng: jax.Array, image_shape: Sequence[int]) -> Variables:
    """Initialises a model for images of `image_shape` = (height, width, channels).

    Returns:
      {'params': ..., 'batch_stats': ...}, all float32 whatever the compute dtype.
    """
    shape = check_image_shape(image_shape)
    variables = model.init(rng, jnp.zeros((1, *shape), jnp.float32), train=False)
    return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def apply_model(
    model: ResNet, variables: Variables, images: jax.Array, *, train: bool
) -> tuple[jax.Array, Any]:
    """Runs the model. Pure: new BatchNorm statistics are returned, never stored.

    Args:
      model: from `create_model`.
      variables: {'params', 'batch_stats'}.
      images: float (batch, height, width, channels).
      train: normalise with the batch's statistics and return updated running statistics;
        otherwise normalise with the running statistics and return them unchanged.

    Returns:
      (float32 logits of shape (batch, num_classes), batch_stats).
    """
    variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
    if train:
        logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
        # Nothing is updated with freeze_bn: the statistics come back as they were.
        return logits, updates.get('batch_stats', variables['batch_stats'])
    return model.apply(variables, images, train=False), variables['batch_stats']
