"""The parts a ResNet is built of: stems and shortcut options (registries: a new one is one
decorated function), the paper's two blocks, and a stage of blocks (unrolled or `nn.scan`).

Every padding is explicit rather than 'SAME': with a stride of 2 on an even input 'SAME' pads
only at the bottom/right, whereas the paper's reference code (Caffe), torchvision and Keras pad
symmetrically. Symmetric padding is what makes converted weights give the same logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any


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
