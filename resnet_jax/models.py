"""The networks of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016).

This module owns the Linen modules, the registry of named presets and the pure helpers that
initialise, apply, and count them. It does no I/O, reads no config objects and knows nothing of
sharding: the trainer decides where arrays live.

Two families, as in the paper:

* ImageNet (Table 1): a 7x7/2 stem and a 3x3/2 max-pool, four stages of basic (18/34) or
  bottleneck (50/101/152) blocks at widths 64..512, global average pooling, a dense head.
* CIFAR (section 4.2): a 3x3 stem with 16 filters, three stages of n basic blocks at widths
  16/32/64 on 32/16/8-pixel maps (6n+2 weighted layers), global average pooling, a dense head.

"plain" nets are the same stacks with the shortcut removed.

Every padding is explicit rather than 'SAME': with a stride of 2 on an even input 'SAME' pads
only at the bottom/right, whereas the paper's reference code (Caffe), torchvision and Keras pad
symmetrically. Symmetric padding is what makes converted weights give the same logits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

ModuleDef = Any
Variables = dict[str, Any]

# He et al. 2015 ("Delving deep into rectifiers"), the initialisation the paper cites [13];
# fan_out as in torchvision and the paper's Caffe models.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


# NHWC x HWIO -> NHWC as axis indices (batch/feature, then spatial), the form Flax's nn.Conv
# passes and the one XLA's CPU backend runs on its fast kernels.
_NHWC_HWIO = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _conv(x: jax.Array, w: jax.Array, padding: Sequence[tuple[int, int]], precision: Any):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=_NHWC_HWIO, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _loop_conv(x: jax.Array, w: jax.Array, padding: tuple, precision: Any) -> jax.Array:
    return _conv(x, w, padding, precision)


def _loop_conv_fwd(x, w, padding, precision):
    return _conv(x, w, padding, precision), (x, w)


def _loop_conv_bwd(padding, precision, residuals, g):
    x, w = residuals
    kh, kw = w.shape[:2]
    (top, bottom), (left, right) = padding
    # Input gradient: g correlated with the flipped kernel, its in/out features swapped back
    # into HWIO order. The barrier keeps XLA from folding the transpose into the convolution,
    # which is exactly the non-canonical form XLA's CPU backend leaves un-fixed inside loops.
    w_t = jax.lax.optimization_barrier(jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    dx = _conv(
        g, w_t, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)), precision
    )
    # Kernel gradient: the batch axis becomes the contracted feature axis and the input
    # features the batch, so this too is an NHWC x HWIO convolution; output (in, kh, kw, out).
    x_t, g_t = jax.lax.optimization_barrier((x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3)))
    dw = _conv(x_t, g_t, padding, precision).transpose(1, 2, 0, 3)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_loop_conv.defvjp(_loop_conv_fwd, _loop_conv_bwd)


def loop_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.conv_general_dilated` whose gradient convolutions are NHWC x HWIO, for loop bodies.

    XLA's CPU backend rewrites a convolution into its canonical NHWC x HWIO form before handing
    it to its fast (Eigen) kernels, but not inside a `while` loop: there JAX's transposed
    convolutions (kernel in/out swapped; batch and features swapped for the kernel gradient)
    are compiled as naive loops, which made a scanned CIFAR ResNet's train step about 9x
    slower than the unrolled one (`benchmarks/compile_time.py --steps=3`, BENCHMARKS.md). This
    version writes both gradients in canonical form. It covers what the scanned blocks use
    (stride 1, no dilation, no groups, NHWC x HWIO) and defers to lax otherwise. It is
    reverse-mode only (custom_vjp): `jax.jvp` through it raises. `ResNet` uses it for the
    scanned blocks on the CPU backend only.
    """
    canonical = (
        tuple(window_strides) == (1, 1)
        and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        and feature_group_count == 1
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC_HWIO
        and not kwargs
    )
    if not canonical:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    if isinstance(padding, str):  # 'VALID' for the 1x1 convolutions, or 'SAME'
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _loop_conv(lhs, rhs, padding, precision)


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding that keeps an odd k x k convolution 'same' at stride 1."""
    p = (k - 1) // 2
    return ((p, p), (p, p))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    # Pads with -inf, like torchvision (after the ReLU this equals Keras's zero padding), then
    # pools without padding: the same numbers, in the form ONNX exporters can express.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='VALID')


# --- Registries: a new stem, shortcut, block or network is added in one place ------------------

StemFn = Callable[[jax.Array, ModuleDef, ModuleDef, int], jax.Array]
ShortcutFn = Callable[[jax.Array, int, int, ModuleDef, ModuleDef], jax.Array]

STEMS: dict[str, StemFn] = {}
SHORTCUTS: dict[str, ShortcutFn] = {}


def register_stem(name: str) -> Callable[[StemFn], StemFn]:
    """Registers `fn(x, conv, norm, width) -> x` as the stem `name` (`create_model(stem=name)`).

    It runs inside the ResNet's own scope: submodules it creates (name them) are the model's.
    """

    def register(fn: StemFn) -> StemFn:
        STEMS[name] = fn
        return fn

    return register


def register_shortcut(name: str) -> Callable[[ShortcutFn], ShortcutFn]:
    """Registers `fn(x, features, strides, conv, norm) -> y` as shortcut option `name`.

    It runs inside each block's `shortcut` submodule: its parameters are
    `.../blockN/shortcut/<the names it gives>`.
    """

    def register(fn: ShortcutFn) -> ShortcutFn:
        SHORTCUTS[name] = fn
        return fn

    return register


@register_stem('imagenet')
def _imagenet_stem(x: jax.Array, conv: ModuleDef, norm: ModuleDef, width: int) -> jax.Array:
    """Table 1: 7x7/2 convolution, then 3x3/2 max-pool."""
    x = conv(width, (7, 7), (2, 2), padding=_pad(7), name='stem_conv')(x)
    return _max_pool_3x3_s2(nn.relu(norm(name='stem_bn')(x)))


@register_stem('cifar')
def _cifar_stem(x: jax.Array, conv: ModuleDef, norm: ModuleDef, width: int) -> jax.Array:
    """Section 4.2: one 3x3 convolution, no pooling."""
    x = conv(width, (3, 3), padding=_pad(3), name='stem_conv')(x)
    return nn.relu(norm(name='stem_bn')(x))


@register_stem('deep')
def _deep_stem(x: jax.Array, conv: ModuleDef, norm: ModuleDef, width: int) -> jax.Array:
    """ResNet-C/D (He et al., "Bag of Tricks", 2019): three 3x3 convolutions (the first
    strided, width/2, width/2, width) replace the 7x7, then the same max-pool."""
    for i, (features, stride) in enumerate(((width // 2, 2), (width // 2, 1), (width, 1)), 1):
        x = conv(features, (3, 3), (stride, stride), padding=_pad(3), name=f'stem_conv{i}')(x)
        x = nn.relu(norm(name=f'stem_bn{i}')(x))
    return _max_pool_3x3_s2(x)


def _shape_changes(x: jax.Array, features: int, strides: int) -> bool:
    return strides != 1 or x.shape[-1] != features


def _project(x: jax.Array, features: int, strides: int, conv: ModuleDef, norm: ModuleDef):
    x = conv(features, (1, 1), (strides, strides), name='proj_conv')(x)
    return norm(name='proj_bn')(x)


@register_shortcut('A')
def _zero_pad_shortcut(x, features, strides, conv, norm):
    """Identity; new channels zero-padded, the map subsampled by striding. No parameters."""
    del conv, norm
    if strides != 1:
        x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    if extra:
        # Split the zero channels evenly on both sides, as the widely used PyTorch CIFAR
        # reproduction does; which side carries them has no effect on what the net can learn.
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


@register_shortcut('B')
def _project_where_needed(x, features, strides, conv, norm):
    """Identity, or a 1x1 projection + BN where the shape changes."""
    if not _shape_changes(x, features, strides):
        return x
    return _project(x, features, strides, conv, norm)


@register_shortcut('C')
def _project_always(x, features, strides, conv, norm):
    """A 1x1 projection + BN on every block."""
    return _project(x, features, strides, conv, norm)


@register_shortcut('D')
def _avg_pool_then_project(x, features, strides, conv, norm):
    """ResNet-D ("Bag of Tricks", 2019): where the map shrinks, a 2x2 average pool does the
    subsampling and the 1x1 projection runs at stride 1, so it sees every input pixel (the
    strided 1x1 of option B skips three in four)."""
    if not _shape_changes(x, features, strides):
        return x
    if strides != 1:
        # Counts only real pixels at an odd map's edge (torch's count_include_pad=False).
        x = nn.avg_pool(
            x, (strides, strides), (strides, strides), padding='SAME', count_include_pad=False
        )
    return _project(x, features, 1, conv, norm)


class Shortcut(nn.Module):
    """The identity path of a residual block: one of `SHORTCUTS`, in its own scope."""

    option: str
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return SHORTCUTS[self.option](x, self.features, self.strides, self.conv, self.norm)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (paper Fig. 2 left), used by ResNet-18/34 and the CIFAR nets."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    last_norm: ModuleDef
    shortcut: str | None  # None: a plain block, no shortcut at all.
    stride_on: str = '1x1'  # Only bottlenecks have a choice; kept for a uniform signature.
    expansion: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = (self.strides, self.strides)
        y = self.conv(self.features, (3, 3), s, padding=_pad(3), name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = self.conv(self.features, (3, 3), padding=_pad(3), name='conv2')(y)
        y = self.last_norm(name='bn2')(y)
        if self.shortcut is not None:
            y = y + Shortcut(
                self.shortcut, self.features, self.strides, self.conv, self.norm, name='shortcut'
            )(x)
        return nn.relu(y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (paper Fig. 5 right), used by ResNet-50/101/152.

    `stride_on='1x1'` puts the stride on the first 1x1 convolution as the paper and Keras do;
    '3x3' puts it on the 3x3 ("ResNet v1.5", torchvision, NVIDIA), which costs more
    multiply-adds and is usually about half a point more accurate.
    """

    features: int  # Width of the 3x3; the block outputs `expansion` times as many channels.
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    last_norm: ModuleDef
    shortcut: str | None
    stride_on: str = '1x1'
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = (self.strides, self.strides)
        s1, s3 = (s, (1, 1)) if self.stride_on == '1x1' else ((1, 1), s)
        y = self.conv(self.features, (1, 1), s1, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = self.conv(self.features, (3, 3), s3, padding=_pad(3), name='conv2')(y)
        y = nn.relu(self.norm(name='bn2')(y))
        out_features = self.features * self.expansion
        y = self.conv(out_features, (1, 1), name='conv3')(y)
        y = self.last_norm(name='bn3')(y)
        if self.shortcut is not None:
            y = y + Shortcut(
                self.shortcut, out_features, self.strides, self.conv, self.norm, name='shortcut'
            )(x)
        return nn.relu(y)


class _ScanCell(nn.Module):
    """Adapts a block to `nn.scan`'s (carry, x) -> (carry, y) signature."""

    block: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        return self.block(name='block')(x), None


class Stage(nn.Module):
    """`num_blocks` blocks at one width; the first may change stride and width.

    Parameters of the unrolled stage live under `block1`, `block2`, ...; with `scan_blocks` the
    identical blocks 2..n are one `nn.scan` whose parameters are stacked on a leading axis under
    `repeated/block`. `resnet_jax.weights.to_scanned` / `to_unrolled` convert between the two.
    """

    block: ModuleDef  # A block class with everything but features/strides bound.
    features: int
    num_blocks: int
    strides: int
    scan_blocks: bool = False
    loop_block: ModuleDef | None = None  # `block` as run inside the scan, if it differs.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.block(self.features, self.strides, name='block1')(x)
        rest = self.num_blocks - 1
        if rest == 0:
            return x
        if not self.scan_blocks:
            for i in range(rest):
                x = self.block(self.features, 1, name=f'block{i + 2}')(x)
            return x
        scanned = nn.scan(
            _ScanCell,
            variable_axes={'params': 0, 'batch_stats': 0},
            split_rngs={'params': True},
            length=rest,
        )
        loop_block = self.loop_block or self.block
        x, _ = scanned(functools.partial(loop_block, self.features, 1), name='repeated')(x, None)
        return x


# --- Options: each declared once, on the field it sets ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """What `create_model` accepts for a field, and how the experiment config shows it.

    Attributes:
      check: True for a valid value.
      expected: what a valid value is, for the error message.
      doc: one line for the docs' option table.
      in_config: the config has a `model.<name>` field for it (dtype lives at the top level,
        input_channels follows the dataset).
      preset_default: the config's '' stands for the preset's own value (shortcut, stem).
    """

    check: Callable[[Any], bool]
    expected: str
    doc: str
    in_config: bool = True
    preset_default: bool = False


def _option(default: Any, check: Callable[[Any], bool], expected: str, doc: str, **kw: Any):
    return dataclasses.field(
        default=default, metadata={'option': Option(check, expected, doc, **kw)}
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_float_dtype(v: Any) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(v), jnp.floating)
    except TypeError:
        return False


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


class ResNet(nn.Module):
    """A residual (or plain) network of the paper.

    Use `create_model(name, ...)` rather than building this directly: the presets fix the stage
    sizes and pick the family's defaults. The fields declared with `_option` are the options
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
    stem: str = _option(
        'imagenet',
        lambda v: v in STEMS,
        'a registered stem (models.STEMS)',
        "the layers before the first stage: 'imagenet' (7x7/2 conv, 3x3/2 max-pool), 'cifar' "
        "(3x3 conv), 'deep' (three 3x3 convs, then the max-pool: ResNet-C/D)",
        preset_default=True,
    )
    shortcut: str | None = _option(
        'B',
        lambda v: v in SHORTCUTS,
        'a registered shortcut (models.SHORTCUTS)',
        'A: identity, zero-padded channels and strided subsampling, no parameters; B: 1x1 '
        'projection only where the shape changes; C: projection on every block; D: 2x2 average '
        'pool, then the projection at stride 1 (ResNet-D). Plain nets have none',
        preset_default=True,
    )
    stride_on: str = _option(
        '1x1',
        lambda v: v in ('1x1', '3x3'),
        "'1x1' or '3x3'",
        'where a bottleneck strides: the paper and Keras (1x1, v1) or torchvision and NVIDIA '
        '(3x3, v1.5)',
    )
    zero_init_residual: bool = _option(
        False, _is_bool, 'a bool', 'the last BN scale of every residual branch starts at 0'
    )
    dtype: Any = _option(
        jnp.float32,
        _is_float_dtype,
        'a floating dtype such as jnp.bfloat16',
        'compute dtype; parameters, BN statistics and logits stay float32 (config: `dtype`)',
        in_config=False,
    )
    bn_momentum: float = _option(
        0.9,
        lambda v: _is_number(v) and 0.0 <= v < 1.0,
        'a number in [0, 1)',
        "BatchNorm running-average decay (0.9 is PyTorch's momentum 0.1)",
    )
    bn_epsilon: float = _option(
        1e-5,
        lambda v: _is_number(v) and 0.0 < v < float('inf'),  # inf: every BN output 0
        'a finite positive number',
        'added to the BatchNorm variance (torchvision 1e-5, Keras 1.001e-5)',
    )
    scan_blocks: bool = _option(
        False,
        _is_bool,
        'a bool',
        'blocks 2..n of each stage run through `nn.scan`: deep nets compile in seconds',
    )
    freeze_bn: bool = _option(
        False,
        _is_bool,
        'a bool',
        'BatchNorm normalises with its running statistics in training too and never updates '
        'them (fine-tuning on small batches)',
    )
    remat: bool = _option(
        False,
        _is_bool,
        'a bool',
        "each block's activations are recomputed in the backward pass instead of kept: less "
        'memory for large batches for about a third more compute, the same numbers (on the '
        'CPU backend only with scan_blocks: BENCHMARKS.md)',
    )
    input_channels: int = _option(
        3,
        lambda v: _is_int(v) and v > 0,
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

        loop_block = None
        if self.scan_blocks and jax.default_backend() == 'cpu':
            # Same parameters and outputs; only the gradient convolutions are written out in
            # the form XLA's CPU backend runs fast inside loops (see loop_conv_general_dilated).
            loop_conv = functools.partial(conv, conv_general_dilated=loop_conv_general_dilated)
            loop_block = functools.partial(block, conv=loop_conv)

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


OPTIONS: dict[str, Option] = {
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
    if not _is_int(num_classes) or num_classes < 1:
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


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(_is_int(d) and d > 0 for d in shape):
        raise ValueError(
            f'image_shape must be (height, width, channels) of positive ints, got {image_shape!r}'
        )
    return shape  # type: ignore[return-value]


def init_variables(model: ResNet, rng: jax.Array, image_shape: Sequence[int]) -> Variables:
    """Initialises a model for images of `image_shape` = (height, width, channels).

    Returns:
      {'params': ..., 'batch_stats': ...}, all float32 whatever the compute dtype.
    """
    shape = _check_image_shape(image_shape)
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


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (BatchNorm running statistics are not params)."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(params)))


def count_flops(model: ResNet, image_shape: Sequence[int]) -> int:
    """Multiply-adds per image of an inference forward pass, counted as the paper counts them.

    Table 1's "FLOPs" are the multiply-adds of the convolutions and the dense head, with every
    tap of every kernel window counted, also where the window overlaps the zero padding (as in
    Caffe, ptflops and fvcore). The count is read off the traced program (the jaxpr), so it
    follows whatever the module really does: no hand-written formula per architecture.

    XLA's own cost analysis (`jax.jit(f).lower(...).cost_analysis()['flops'] / 2`) skips the
    taps that fall on padding and also counts BatchNorm, ReLU and additions; it comes out 2-7%
    lower on these nets (most on ResNet-18/34, whose 3x3 convolutions dominate). `tests/`
    checks both against each other.
    """
    shape = _check_image_shape(image_shape)
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shape))
    images = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v, x: apply_model(model, v, x, train=False)[0])(abstract, images)
    return _count_multiply_adds(jaxpr.jaxpr)


def _count_multiply_adds(jaxpr: Any) -> int:
    """Multiply-adds of the convolutions and matrix products in `jaxpr`, through sub-jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == 'conv_general_dilated':
            rhs = eqn.invars[1].aval.shape
            out = eqn.outvars[0].aval.shape
            out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
            # Each output element costs one multiply-add per tap of its (grouped) kernel.
            total += (
                int(np.prod(out, dtype=np.int64) * np.prod(rhs, dtype=np.int64)) // out_features
            )
        elif name == 'dot_general':
            (lhs_contracting, _), _ = eqn.params['dimension_numbers']
            lhs = eqn.invars[0].aval.shape
            depth = int(np.prod([lhs[d] for d in lhs_contracting], dtype=np.int64))
            total += int(np.prod(eqn.outvars[0].aval.shape, dtype=np.int64)) * depth
        repeats = eqn.params.get('length', 1) if name == 'scan' else 1
        for param in eqn.params.values():
            inner = getattr(param, 'jaxpr', param)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, 'eqns'):
                total += repeats * _count_multiply_adds(inner)
    return total
