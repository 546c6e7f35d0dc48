"""Memory for large batches: gradient accumulation (`optimizer.accumulate_steps`) and
rematerialised blocks (`model.remat`)."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax import config as config_lib
from resnet_jax import optim, steps, workdir
from resnet_jax.train_state import create_train_state

SHAPE = (8, 8, 3)


def _run(model, cfg, batches):
    """The parameters (in float64) before and after each train step, one per batch."""
    as64 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float64), tree)
    params = as64(rj.init_variables(model, jax.random.key(0), SHAPE)['params'])
    tx, schedule = optim.create_optimizer(cfg, params, total_steps=100, steps_per_epoch=10)
    state = create_train_state(model, tx, 0, SHAPE)
    params = as64(state.params)
    state = state.replace(
        params=params, batch_stats=as64(state.batch_stats), opt_state=tx.init(params)
    )
    step = jax.jit(steps.make_train_step(model, tx, schedule))
    history = [state.params]
    for batch in batches:
        state, _ = step(state, batch)
        history.append(state.params)
    return history


@pytest.mark.slow  # two train-step compiles in float64
@jax.enable_x64(True)
def test_accumulated_micro_batches_equal_one_step_of_their_union():
    # BatchNorm frozen (running statistics in training too): the loss of the union is then the
    # mean of the micro-batches' losses, and MultiSteps averages their gradients. float64: the
    # same sum in another order, equal to rounding.
    model = rj.create_model('resnet20', num_classes=10, freeze_bn=True, dtype='float64')
    images = jax.random.normal(jax.random.key(1), (2, 8, *SHAPE), jnp.float64)
    labels = jax.random.randint(jax.random.key(2), (2, 8), 0, 10)
    cfg = optim.OptimizerConfig(schedule='constant', learning_rate=0.5, weight_decay=1e-3)
    whole = [{'image': images[i], 'label': labels[i]} for i in range(2)]
    halves = [
        {'image': images[i, h * 4 : h * 4 + 4], 'label': labels[i, h * 4 : h * 4 + 4]}
        for i in range(2)
        for h in range(2)
    ]
    big = _run(model, cfg, whole)
    accumulated = _run(model, dataclasses.replace(cfg, accumulate_steps=2), halves)
    # The first micro-batch only accumulates; the second applies the update of the union.
    chex.assert_trees_all_equal(accumulated[1], accumulated[0])
    for ours, theirs in ((accumulated[2], big[1]), (accumulated[4], big[2])):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), ours, theirs
        )
    assert not np.allclose(big[1]['head']['bias'], big[0]['head']['bias'])


def test_accumulation_reads_the_schedule_at_the_trainers_step():
    params = {'w': jnp.ones(3)}
    cfg = optim.OptimizerConfig(
        name='sgd',
        momentum=0.0,
        weight_decay=0.0,
        learning_rate=1.0,
        boundaries=(4,),
        decay_factor=0.5,
        accumulate_steps=2,
    )
    tx, schedule = optim.create_optimizer(cfg, params, total_steps=8, steps_per_epoch=8)
    state = tx.init(params)
    moved = []
    for _ in range(8):
        updates, state = tx.update({'w': jnp.ones(3)}, state, params)
        moved.append(float(-updates['w'][0]))
    # Updates land on every second step; those at steps 2 and 4 (before the boundary at
    # trainer step 4) use 1.0, the later ones 0.5.
    assert moved == [0.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.0, 0.5]
    assert float(schedule(5)) == 0.5


@pytest.mark.slow  # four compiles
def test_remat_computes_the_same_numbers():
    images = jax.random.normal(jax.random.key(1), (4, *SHAPE))
    labels = jnp.arange(4)

    def loss_and_grads(remat):
        model = rj.create_model('resnet20', num_classes=10, remat=remat)
        variables = rj.init_variables(model, jax.random.key(0), SHAPE)

        def loss(params):
            v = {'params': params, 'batch_stats': variables['batch_stats']}
            logits, stats = rj.apply_model(model, v, images, train=True)
            return rj.metrics.cross_entropy(logits, labels).mean(), stats

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])

    (plain_loss, plain_stats), plain_grads = loss_and_grads(False)
    (remat_loss, remat_stats), remat_grads = loss_and_grads(True)
    # The same operations on the same values: XLA may fuse the recomputation differently, so
    # float32 rounding, not more (gradients here are O(1), their rounding ~1e-7).
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        remat_grads,
        plain_grads,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        remat_stats,
        plain_stats,
    )


def test_remat_may_change_between_runs_accumulation_may_not():
    config = config_lib.base_config()
    model = config_lib.create_model_from_config(config, num_classes=10)
    before = workdir.identity(config, model)
    config.model.remat = True
    assert workdir.identity(config, model) == before
    config.optimizer.accumulate_steps = 2
    with pytest.raises(ValueError, match=r'optimizer.accumulate_steps=1 \(this config: 2\)'):
        workdir.check_identity(before, workdir.identity(config, model), 'checkpoint step 3')
    # Checkpoints written before the field existed were of accumulate_steps=1.
    del before['optimizer.accumulate_steps']
    config.optimizer.accumulate_steps = 1
    workdir.check_identity(before, workdir.identity(config, model), 'checkpoint step 3')


@pytest.mark.parametrize(
    'value, message',
    [
        ('0', 'invalid config: optimizer.accumulate_steps=0; expected a positive int'),
        ('-2', 'invalid config: optimizer.accumulate_steps=-2; expected a positive int'),
        ('1.5', "config optimizer.accumulate_steps='1.5': expected int, like 1"),
        ('two', "config optimizer.accumulate_steps='two': expected int, like 1"),
    ],
)
def test_a_bad_accumulate_steps_is_one_clear_error(value, message):
    config = config_lib.base_config()
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.apply_overrides(config, {'optimizer.accumulate_steps': value})
        config_lib.validate(config, device_count=1, process_count=1)
