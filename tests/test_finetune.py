"""Fine-tuning: a torchvision file as the start of a run, frozen parameters, a slower backbone,
frozen BatchNorm statistics (configs/finetune.py), and the errors of a bad pattern."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax as rj
from configs import finetune
from resnet_jax import config as config_lib
from resnet_jax import evaluation, optim, trainer, weights
from resnet_jax.metrics import read_metrics


def _paths(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {optim.parameter_path(p): np.asarray(v) for p, v in leaves}


@pytest.mark.slow  # two optimizer compiles
def test_frozen_parameters_get_no_updates_and_the_backbone_a_scaled_rate():
    model = rj.create_model('resnet20', num_classes=10)
    params = rj.init_variables(model, jax.random.key(0), (32, 32, 3))['params']
    grads = jax.tree.map(jnp.ones_like, params)

    def updates(**fields):
        cfg = optim.OptimizerConfig(decay_bn_and_bias=False, **fields)
        tx, _ = optim.create_optimizer(cfg, params, total_steps=10, steps_per_epoch=5)
        step = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])  # one dispatch, not hundreds
        return _paths(step(grads, params))

    plain = updates()
    tuned = updates(frozen=('^stem', '^stage1/'), backbone_lr_multiplier=0.1)
    assert plain.keys() == tuned.keys()
    for name, update in tuned.items():
        if name.startswith(('stem', 'stage1/')):
            assert not update.any(), name
        elif name.startswith('head/'):
            np.testing.assert_array_equal(update, plain[name])
        else:
            np.testing.assert_allclose(update, 0.1 * plain[name], rtol=1e-6)
    # Without the fields the optimizer (and so its state in checkpoints) is what it was.
    cfg = optim.OptimizerConfig()
    tx, _ = optim.create_optimizer(cfg, params, total_steps=10, steps_per_epoch=5)
    assert 'MultiTransform' not in type(tx.init(params)).__name__


@pytest.mark.parametrize(
    'fields, message',
    [
        ({'frozen': ('stage9',)}, "frozen has 'stage9', which matches no parameter; paths look "),
        ({'frozen': ('stage[1',)}, "frozen has 'stage\\[1', not a regular expression"),
        ({'frozen': 'stem'}, "frozen='stem'; expected a tuple of regular expressions"),
        (
            {'backbone_lr_multiplier': -1.0},
            'backbone_lr_multiplier=-1.0; expected a finite number >= 0',
        ),
    ],
)
def test_bad_fine_tuning_fields_are_one_clear_error(fields, message):
    model = rj.create_model('resnet20', num_classes=10)
    params = rj.init_variables(model, jax.random.key(0), (32, 32, 3))['params']
    cfg = optim.OptimizerConfig(**fields)
    with pytest.raises(ValueError, match=f'invalid config: optimizer.{message}'):
        optim.check_config(cfg, total_steps=10)
        optim.create_optimizer(cfg, params, total_steps=10, steps_per_epoch=5)


def test_freeze_bn_normalises_with_the_running_statistics_and_keeps_them():
    model = rj.create_model('resnet20', num_classes=10, freeze_bn=True)
    variables = rj.init_variables(model, jax.random.key(0), (32, 32, 3))
    stats = jax.tree.map(lambda x: x + 0.5, variables['batch_stats'])  # not the init values
    variables = {'params': variables['params'], 'batch_stats': stats}
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    train_logits, new_stats = rj.apply_model(model, variables, images, train=True)
    eval_logits, _ = rj.apply_model(model, variables, images, train=False)
    np.testing.assert_array_equal(train_logits, eval_logits)
    chex.assert_trees_all_equal(new_stats, stats)


def _config(data_dir, init_from, **overrides):
    config = finetune.get_config('resnet18')
    config_lib.apply_overrides(
        config,
        {
            'dataset.data_dir': str(data_dir),
            'dataset.train_split': 'train[:512]',
            'dataset.eval_split': 'test[:32]',
            'dataset.test_split': '',
            'batch_size': 32,
            'eval_batch_size': 32,
            'optimizer.learning_rate': 0.05,
            'optimizer.warmup_steps': 1,
            'log_every_steps': 1,
            'eval_every_steps': 8,
            'checkpoint_every_steps': 8,
            'init_from': str(init_from),
            **overrides,
        },
    )
    return config


def test_a_torchvision_file_fine_tuned_on_cifar10(cifar10_data_dir, tmp_path, torch):
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    file = tmp_path / 'resnet18.pth'
    torch.save(state, file)
    model = rj.create_model('resnet18', num_classes=1000, stride_on='3x3')
    expected = _paths(weights.from_torchvision(state, model))  # the file, in our layout

    # Step 0 (an evaluation-only run): everything but the head (1000 classes there, 10 here)
    # is the file's.
    workdir = str(tmp_path / 'run')
    trainer.train_and_evaluate(_config(cifar10_data_dir, file, total_steps=0), workdir)
    state0, _ = evaluation.read_train_state(workdir, step=0, config=_config(cifar10_data_dir, file))
    start = {**_paths(state0.params), **_paths({'bs': state0.batch_stats})}
    for name, value in _paths(state0.params).items():
        if not name.startswith('head/'):
            np.testing.assert_array_equal(value, expected[f'params/{name}'], err_msg=name)

    # Eight steps on from there: frozen parameters and all BatchNorm statistics never move; the
    # rest do, and the loss falls.
    config = _config(cifar10_data_dir, file, total_steps=8)
    trainer.train_and_evaluate(config, workdir)
    state8, run = evaluation.read_train_state(workdir, config=config)
    step = run.step
    assert step == 8
    for name, value in _paths(state8.params).items():
        if name.startswith(('stem', 'stage1/')):
            np.testing.assert_array_equal(value, start[name], err_msg=name)
        elif name.endswith('kernel'):
            assert not np.array_equal(value, start[name]), name
    for name, value in _paths({'bs': state8.batch_stats}).items():
        np.testing.assert_array_equal(value, start[name], err_msg=name)
    records = read_metrics(tmp_path / 'run' / 'metrics.jsonl')
    losses = [r['train/loss'] for r in records if 'train/loss' in r]
    assert len(losses) == 8 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
