"""`steps_per_call=K`: K train steps in one jitted call (lax.scan), equal to K single steps,
with the loop's actions between calls, remainders and off-grid resumes in single steps."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_reliability import _smoke

import resnet_jax as rj
from resnet_jax import checkpoint, optim, steps, trainer
from resnet_jax import config as config_lib
from resnet_jax.metrics import read_metrics
from resnet_jax.train_state import create_train_state


@pytest.mark.slow  # two compiles in float64
@jax.enable_x64(True)
def test_a_call_of_k_steps_equals_k_single_steps():
    shape = (8, 8, 3)
    model = rj.create_model('resnet20', num_classes=10, dtype='float64')
    as64 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float64), tree)
    params = as64(rj.init_variables(model, jax.random.key(0), shape)['params'])
    cfg = optim.OptimizerConfig(boundaries=(2,))  # the schedule changes inside the call
    tx, schedule = optim.create_optimizer(cfg, params, total_steps=4, steps_per_epoch=2)
    state = create_train_state(model, tx, 0, shape)
    params = as64(state.params)
    state = state.replace(
        params=params, batch_stats=as64(state.batch_stats), opt_state=tx.init(params)
    )
    images = jax.random.normal(jax.random.key(1), (3, 4, *shape), jnp.float64)
    labels = jax.random.randint(jax.random.key(2), (3, 4), 0, 10)
    train_step = steps.make_train_step(model, tx, schedule)
    single, singles = state, []
    for i in range(3):
        single, m = jax.jit(train_step)(single, {'image': images[i], 'label': labels[i]})
        singles.append(m)
    multi, stacked = jax.jit(steps.make_multi_step(train_step))(
        state, {'image': images, 'label': labels}
    )
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    jax.tree.map(close, multi.params, single.params)
    jax.tree.map(close, multi.batch_stats, single.batch_stats)
    assert int(multi.step) == 3
    for i, m in enumerate(singles):
        jax.tree.map(close, jax.tree.map(lambda x, i=i: x[i], stacked), m)


def _losses(workdir):
    records = read_metrics(workdir / 'metrics.jsonl')
    return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


def test_the_trainer_with_k_steps_per_call_logs_saves_and_resumes_like_single_steps(
    cifar10_data_dir, tmp_path
):
    # A small learning rate: float32 rounding of a step compiled inside a loop differs from a
    # single step's, and the smoke config's 0.1 on 16 images amplifies it to 0.4% in 6 steps.
    every = {
        'log_every_steps': 2,
        'eval_every_steps': 2,
        'checkpoint_every_steps': 2,
        'optimizer.learning_rate': 0.001,
    }
    config = lambda **o: _smoke(cifar10_data_dir, **every, **o)
    single, multi, resumed = tmp_path / 'single', tmp_path / 'multi', tmp_path / 'resumed'
    trainer.train_and_evaluate(config(), str(single))
    trainer.train_and_evaluate(config(steps_per_call=2), str(multi))
    # Stopped at 3 (one call of 2, then a single step), resumed off the grid (a single step to
    # 4, then calls).
    trainer.train_and_evaluate(config(steps_per_call=2, total_steps=3), str(resumed))
    trainer.train_and_evaluate(config(steps_per_call=2), str(resumed))
    want = _losses(single)
    assert sorted(want) == [2, 4, 6]
    # The interrupted run logged its last step, 3, so its line at 4 is the mean of step 4 only.
    for run, logged in ((multi, [2, 4, 6]), (resumed, [2, 6])):
        got = _losses(run)
        # float32: the step inside a loop may be fused differently, rounding apart only.
        np.testing.assert_allclose([got[s] for s in logged], [want[s] for s in logged], rtol=1e-4)
    assert sorted(_losses(resumed)) == [2, 3, 4, 6]
    assert checkpoint.committed_steps(str(multi / 'checkpoints')) == [2, 4, 6]


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'steps_per_call': '0'}, 'steps_per_call=0; expected a positive int'),
        (
            {'steps_per_call': '4', 'log_every_steps': '6'},
            'log_every_steps=6 is not a multiple of steps_per_call=4 (actions run between calls)',
        ),
    ],
)
def test_bad_steps_per_call_is_one_clear_error(overrides, message):
    config = config_lib.base_config()
    config_lib.apply_overrides(
        config, {'eval_every_steps': '8', 'checkpoint_every_steps': '8', **overrides}
    )
    with pytest.raises(ValueError, match=re.escape(f'invalid config: {message}')):
        config_lib.validate(config, device_count=1, process_count=1)
