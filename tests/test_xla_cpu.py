"""Tests of resnet_jax.xla_cpu: the loop convolution equals lax's in value and gradients, and XLA's
CPU backend runs a scanned step's convolutions in canonical form.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax import xla_cpu


@pytest.mark.parametrize(
    'kernel,padding,strides',
    [
        ((3, 3), ((1, 1), (1, 1)), (1, 1)),
        ((1, 1), 'VALID', (1, 1)),
        ((3, 3), 'SAME', (1, 1)),
        ((3, 3), ((0, 2), (2, 1)), (1, 1)),  # asymmetric
        ((3, 3), ((1, 1), (1, 1)), (2, 2)),  # strided: left to lax
    ],
)
@jax.enable_x64(True)
@pytest.mark.slow
def test_loop_convolution_matches_lax_in_value_and_gradients(kernel, padding, strides):
    # float64: the two compute the same function, so they must agree to rounding at 1e-16.
    x = jax.random.normal(jax.random.key(0), (3, 9, 8, 5), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (*kernel, 5, 7), jnp.float64)
    # As Flax passes them, and as most callers write them.
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
    if padding == 'SAME':
        dims = ('NHWC', 'HWIO', 'NHWC')

    def loss(conv, x, w):
        y = conv(x, w, strides, padding, dimension_numbers=dims)
        return jnp.sum(jnp.sin(y)), y

    (_, want), want_grads = jax.value_and_grad(
        functools.partial(loss, jax.lax.conv_general_dilated), argnums=(0, 1), has_aux=True
    )(x, w)
    (_, got), got_grads = jax.value_and_grad(
        functools.partial(loss, xla_cpu.loop_conv_general_dilated), argnums=(0, 1), has_aux=True
    )(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    jaxpr = str(jax.make_jaxpr(functools.partial(loss, xla_cpu.loop_conv_general_dilated))(x, w))
    assert ('custom_vjp_call' in jaxpr) == (strides == (1, 1)), 'took the wrong path'
    for g, e in zip(got_grads, want_grads, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype == jnp.float64
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


@jax.enable_x64(True)
@pytest.mark.slow
def test_loop_convolution_gradients_under_vmap_match_lax():
    # bn_group_size vmaps the model over groups of the batch, and with it this convolution.
    xs = jax.random.normal(jax.random.key(0), (2, 3, 6, 6, 4), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5), jnp.float64)
    dims = jax.lax.conv_dimension_numbers(xs.shape[1:], w.shape, ('NHWC', 'HWIO', 'NHWC'))

    def grads(conv):
        def loss(x, w):
            return jnp.sum(jnp.sin(conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)))

        return jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None))(xs, w)

    for g, e in zip(
        grads(xla_cpu.loop_conv_general_dilated), grads(jax.lax.conv_general_dilated), strict=True
    ):
        assert g.dtype == jnp.float64
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_scanned_train_step_runs_its_loop_convolutions_in_canonical_form():
    """Inside a loop, XLA's CPU backend runs fast only NHWC x HWIO convolutions (see
    xla_cpu.loop_conv_general_dilated); a transposed one there cost a 10x slower step."""
    from resnet_jax import optim, steps
    from resnet_jax.train_state import create_train_state

    model = rj.create_model('resnet20', num_classes=10, scan_blocks=True)
    # 16 pixels, so the last stage is 4x4: on a 2x2 map (a 3x3 window wider than the input)
    # XLA's CPU backend swaps the operands of even the forward convolution, on purpose.
    shape = (16, 16, 3)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))['params']
    tx, schedule = optim.create_optimizer(
        optim.OptimizerConfig(), params, total_steps=10, steps_per_epoch=1
    )
    state = jax.eval_shape(lambda: create_train_state(model, tx, 0, shape))
    batch = {
        'image': jax.ShapeDtypeStruct((2, *shape), jnp.float32),
        'label': jax.ShapeDtypeStruct((2,), jnp.int32),
    }
    hlo = jax.jit(steps.make_train_step(model, tx, schedule)).lower(state, batch).compile()
    in_loops = [
        line for line in hlo.as_text().splitlines() if ' convolution(' in line and '/while/' in line
    ]
    # Forward and backward convolutions of the 2 scanned blocks x 3 stages are all there.
    assert len(in_loops) >= 3 * 2 * 3, len(in_loops)
    layouts = {line.split('dim_labels=')[1].split(',')[0] for line in in_loops}
    assert layouts == {'b01f_01io->b01f'}, layouts
