"""Tests of resnet_jax.optim: every optimizer is one config change, the paper's schedules, weight
decay masks, clipping, gradient centralisation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_trainer import TINY_SHAPE, _tiny_batch, _tiny_setup, _with

import resnet_jax as rj
from configs import cifar10, smoke
from resnet_jax import config as config_lib
from resnet_jax import (
    optim,
    steps,
)
from resnet_jax.train_state import create_train_state


@pytest.mark.parametrize('name', [*optim.OPTIMIZERS, 'adam', 'rmsprop', 'adagrad'])
@pytest.mark.parametrize('mode', optim.WEIGHT_DECAY_MODES)
def test_every_named_optimizer_is_one_config_change(name, mode):
    cfg = smoke.get_config().optimizer
    with cfg.unlocked():
        cfg.name = name
        cfg.weight_decay_mode = mode
        cfg.learning_rate = 0.05
        if mode == 'decoupled' and name not in (
            'sgd',
            'momentum',
            'nesterov',
            'adamw',
            'lamb',
            'lars',
        ):
            cfg.weight_decay = 0.0  # generic optax optimizers take decay through kwargs
    params = {'w': {'kernel': jnp.ones((3, 3))}, 'bn': {'scale': jnp.ones(3)}}
    tx, _ = optim.create_optimizer(cfg, params, total_steps=10, steps_per_epoch=1)
    loss = lambda p: jnp.sum(p['w']['kernel'] ** 2) + jnp.sum((p['bn']['scale'] - 2) ** 2)
    state = tx.init(params)
    start = loss(params)
    for _ in range(5):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert loss(params) < start


def test_unknown_optimizer_and_bad_kwargs():
    cfg = smoke.get_config().optimizer
    with cfg.unlocked():
        cfg.name = 'adamm'
    with pytest.raises(ValueError, match=r"optimizer.name 'adamm' is not an optax optimizer"):
        optim.create_optimizer(cfg, {}, total_steps=10, steps_per_epoch=1)
    with cfg.unlocked():
        cfg.name = 'adam'
        cfg.weight_decay = 0.0
        cfg.kwargs = {'beta_one': 0.9}
    with pytest.raises(ValueError, match=r"optimizer 'adam' rejected optimizer.kwargs"):
        optim.create_optimizer(cfg, {}, total_steps=10, steps_per_epoch=1)


def test_weight_decay_mask_excludes_bn_and_biases_when_asked():
    model = rj.create_model('resnet20', num_classes=10, scan_blocks=True)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), TINY_SHAPE))
    mask = optim.weight_decay_mask(params['params'], decay_bn_and_bias=False)
    flat = {
        '/'.join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert flat['stem_conv/kernel'] and flat['head/kernel']
    assert flat['stage2/repeated/block/conv1/kernel']
    assert not flat['head/bias'] and not flat['stem_bn/scale'] and not flat['stem_bn/bias']
    assert not flat['stage2/repeated/block/bn1/scale']  # 2-D when scanned: decided by name
    everything = optim.weight_decay_mask(params['params'], decay_bn_and_bias=True)
    assert all(jax.tree.leaves(everything))

    # Coupled decay with the mask leaves BN scales alone: only their gradient moves them.
    cfg = smoke.get_config().optimizer
    with cfg.unlocked():
        cfg.name, cfg.decay_bn_and_bias, cfg.weight_decay = 'sgd', False, 0.5
    tx, _ = optim.create_optimizer(
        cfg, {'kernel': jnp.ones(2), 'scale': jnp.ones(2)}, total_steps=10, steps_per_epoch=1
    )
    p = {'kernel': jnp.ones(2), 'scale': jnp.ones(2)}
    zero_grads = jax.tree.map(jnp.zeros_like, p)
    updates, _ = tx.update(zero_grads, tx.init(p), p)
    np.testing.assert_allclose(updates['kernel'], -0.1 * 0.5)
    np.testing.assert_allclose(updates['scale'], 0.0)


def test_the_papers_schedules():
    c = cifar10.get_config('resnet20')
    schedule = optim.learning_rate_schedule(c.optimizer, c.total_steps, 351)
    assert [float(schedule(s)) for s in (0, 31_999, 32_000, 47_999, 48_000)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001]
    )
    deep = cifar10.get_config('resnet110')
    schedule = optim.learning_rate_schedule(deep.optimizer, deep.total_steps, 351)
    assert [float(schedule(s)) for s in (0, 399, 400, 31_999, 32_000, 48_000)] == pytest.approx(
        [0.01, 0.01, 0.1, 0.1, 0.01, 0.001]
    )
    with deep.unlocked():
        deep.optimizer.schedule = 'cosine'
        deep.optimizer.warmup_mode = 'linear'
        deep.optimizer.warmup_learning_rate = 0.0
    schedule = optim.learning_rate_schedule(deep.optimizer, 1000, 351)
    assert float(schedule(0)) == 0.0 and float(schedule(400)) == pytest.approx(0.1)
    assert float(schedule(1000)) < 1e-6
    with c.unlocked():
        c.optimizer.boundaries = ()
        c.optimizer.boundaries_epochs = (2,)
    schedule = optim.learning_rate_schedule(c.optimizer, c.total_steps, 351)
    assert float(schedule(701)) == pytest.approx(0.1) and float(schedule(702)) == pytest.approx(
        0.01
    )


def test_gradient_clipping_bounds_the_update():
    cfg = _with(
        smoke.get_config(),
        **{
            'optimizer.name': 'sgd',
            'optimizer.weight_decay': 0.0,
            'optimizer.grad_clip_norm': 1.0,
        },
    ).optimizer
    params = {'kernel': jnp.zeros(4)}
    tx, _ = optim.create_optimizer(cfg, params, total_steps=10, steps_per_epoch=1)
    updates, _ = tx.update({'kernel': jnp.full(4, 100.0)}, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 0.1 * 1.0, rtol=1e-6)  # lr x max norm


def test_the_config_optimizer_section_is_the_optimizer_defaults():
    import dataclasses

    base = config_lib.base_config().optimizer.to_dict()
    assert base == dataclasses.asdict(optim.OptimizerConfig())
    assert base['name'] == 'momentum' and base['learning_rate'] == 0.1  # the paper's


@pytest.mark.slow
def test_gradient_centralisation_removes_each_kernels_mean():
    tx = optim.centralize_gradients()
    grads = {
        'conv': {'kernel': jax.random.normal(jax.random.key(0), (3, 3, 4, 8)) + 5.0},
        'bn': {'scale': jnp.arange(8.0)},
    }
    out, _ = tx.update(grads, tx.init(grads))
    kernel = grads['conv']['kernel']
    np.testing.assert_allclose(
        out['conv']['kernel'], kernel - kernel.mean(axis=(0, 1, 2), keepdims=True), atol=1e-6
    )
    np.testing.assert_allclose(out['conv']['kernel'].mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_array_equal(out['bn']['scale'], grads['bn']['scale'])  # vectors unchanged
    # As an optimizer: a train step runs, and its update is centralised too (lr 0.1, no decay).
    model, _, _, _ = _tiny_setup()
    cfg = _with(
        smoke.get_config(), **{'optimizer.name': 'momentum_gc', 'optimizer.weight_decay': 0.0}
    ).optimizer
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), TINY_SHAPE))
    tx, schedule = optim.create_optimizer(cfg, params['params'], total_steps=10, steps_per_epoch=1)
    state = create_train_state(model, tx, 0, TINY_SHAPE)
    new, metrics = jax.jit(steps.make_train_step(model, tx, schedule))(state, _tiny_batch())
    delta = (
        new.params['stage1']['block1']['conv1']['kernel']
        - state.params['stage1']['block1']['conv1']['kernel']
    )
    np.testing.assert_allclose(delta.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    assert np.isfinite(float(metrics['loss']))
