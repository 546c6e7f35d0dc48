"""What a network costs, as the paper's Table 1 counts it: parameters and multiply-adds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import ResNet, apply_model, check_image_shape, init_variables


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
    shape = check_image_shape(image_shape)
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
