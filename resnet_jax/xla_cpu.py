"""Workarounds for XLA's CPU backend, decided in this one place.

XLA's CPU backend rewrites a convolution into its canonical NHWC x HWIO form before it hands it
to its fast (Eigen) kernels, but not inside a loop body (`while`, so `lax.scan` and `nn.scan`):
there the transposed convolutions of JAX's gradients run as naive loops, about 10x slower. Two
consequences, both switched on here and only on the CPU backend:

* `loop_conv(conv)`: the convolution the scanned blocks of a ResNet run (`scan_blocks`), with
  both gradient convolutions written out in canonical form (`loop_conv_general_dilated`);
* `unroll_loops()`: K train steps per call (`steps_per_call`) are unrolled rather than looped.

Other backends (GPU, TPU) keep plain convolutions and real loops.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def active() -> bool:
    """Whether the computations run on XLA's CPU backend, which needs the workarounds."""
    return jax.default_backend() == 'cpu'


def unroll_loops() -> bool:
    """Whether loops of train steps should be unrolled (`jax.lax.scan(..., unroll=)`)."""
    return active()


def loop_conv(conv: Any) -> Any | None:
    """The convolution module (an `nn.Conv` partial) for the blocks inside `nn.scan`: on the
    CPU backend one whose gradients are canonical; elsewhere None (use `conv` itself)."""
    if not active():
        return None
    return functools.partial(conv, conv_general_dilated=loop_conv_general_dilated)


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
    reverse-mode only (custom_vjp): `jax.jvp` through it raises.
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
