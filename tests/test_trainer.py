"""Tests of the trainer: steps, optimizer and schedules by config, checkpoints, configs, CLI."""

import os
import re
import subprocess
import sys
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from synthetic_data import synthetic_info, synthetic_source

import resnet_jax as rj
from configs import cifar10, smoke
from resnet_jax import (
    checkpoint,
    optim,
    pipelines,
    preprocessing,
    sharding,
    sources,
    trainer,
)
from resnet_jax import config as config_lib
from resnet_jax.metrics import read_metrics
from resnet_jax.train_state import create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SHAPE = (8, 8, 3)


def _with(config, **dotted):
    """`config` with fields set by dotted name ('optimizer.name'), as --config.x=y does."""
    config_lib.apply_overrides(config, dotted)
    return config


def _tiny_setup(optimizer_name='momentum', learning_rate=0.1):
    config = smoke.get_config()
    model = rj.create_model('resnet20', num_classes=10)
    with config.unlocked():
        config.optimizer.name = optimizer_name
        config.optimizer.learning_rate = learning_rate
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), TINY_SHAPE))
    tx, schedule = optim.create_optimizer(
        config.optimizer, params['params'], total_steps=100, steps_per_epoch=10
    )
    state = create_train_state(model, tx, 0, TINY_SHAPE)
    return model, tx, schedule, state


def _tiny_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        'image': jnp.asarray(rng.normal(size=(n, *TINY_SHAPE)), jnp.float32),
        'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32),
    }


# --- Steps -----------------------------------------------------------------------------------


# --- Optimizers and schedules ----------------------------------------------------------------


# --- Configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize('name', rj.CIFAR_MODELS)
def test_every_cifar_config_validates(name):
    config_lib.validate(cifar10.get_config(name), device_count=8, process_count=1)


@pytest.mark.parametrize(
    'field,value,message',
    [
        ('batch_size', 12, 'batch_size=12 is not divisible by the 8 devices'),
        ('batch_size', 0, 'batch_size=0 is not a positive int'),
        ('total_steps', -5, 'total_steps=-5; expected a non-negative int'),
        ('dtype', 'float16', "dtype='float16'; expected one of float32, bfloat16"),
        ('model.name', 'resnet19', "unknown model name 'resnet19'; expected one of resnet18"),
        ('model.shortcut', 'E', "option shortcut='E' is invalid; expected a registered shortcut"),
        ('model.stem', 'wide', "option stem='wide' is invalid; expected a registered stem"),
        ('optimizer.name', 'adamm', "optimizer.name='adamm'; expected one of sgd"),
        ('optimizer.schedule', 'step', "optimizer.schedule='step'"),
        (
            'optimizer.learning_rate',
            -0.1,
            'optimizer.learning_rate=-0.1; expected a finite number > 0',
        ),
        ('optimizer.warmup_steps', 70_000, 'warmup_steps=70000 must be below total_steps'),
        ('dataset.augmentation', 'autoaugment', "dataset: unknown augmentation 'autoaugment'"),
        ('dataset.name', 'mnist', "dataset: unknown dataset 'mnist': expected one of cifar10"),
        ('dataset.normalization', 'zca', "dataset.normalization='zca'; expected one of"),
    ],
)
def test_validate_names_the_bad_value(field, value, message):
    config = _with(cifar10.get_config('resnet20'), **{field: value})
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config, device_count=8, process_count=1)


def test_cifar10_config_rejects_an_imagenet_model():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        cifar10.get_config('resnet50')


# --- Checkpoints -----------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_restores_onto_fewer_devices(tmp_path):
    *_, state = _tiny_setup()
    mesh8 = sharding.data_mesh()
    replicated8 = NamedSharding(mesh8, PartitionSpec())
    state8 = jax.device_put(state, replicated8)
    manager = checkpoint.create_manager(str(tmp_path), save_every_steps=1, keep=2)
    checkpoint.save(manager, 7, state8, meta={'identity': {'model.name': 'resnet20'}}, force=True)
    checkpoint.wait(manager)
    assert checkpoint.read_meta(manager, 7) == {'identity': {'model.name': 'resnet20'}}

    mesh1 = sharding.data_mesh(jax.devices()[:1])
    replicated1 = NamedSharding(mesh1, PartitionSpec())
    target = checkpoint.abstract_with_shardings(
        jax.eval_shape(lambda: state), jax.tree.map(lambda _: replicated1, state)
    )
    restored, meta = checkpoint.restore(manager, manager.latest_step(), target)
    assert meta['identity'] == {'model.name': 'resnet20'}
    manager.close()
    assert restored.params['head']['kernel'].sharding.device_set == {jax.devices()[0]}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.verify(str(tmp_path), 7) is None and checkpoint.has_fingerprint(
        str(tmp_path), 7
    )


def test_fingerprints_are_written_off_the_training_thread(tmp_path, monkeypatch):
    """Hashing a step reads all of it: never on the thread that trains."""
    hashed_on = []
    digest = checkpoint.content_digest
    monkeypatch.setattr(
        checkpoint,
        'content_digest',
        lambda step_dir: hashed_on.append(threading.current_thread().name) or digest(step_dir),
    )
    state = {'w': np.arange(4.0, dtype=np.float32)}
    manager = checkpoint.create_manager(str(tmp_path), save_every_steps=1, keep=3)
    for step in (1, 2, 3):  # each save fingerprints the steps committed before it
        checkpoint.save(manager, step, state, meta={}, force=True)
    assert threading.current_thread().name not in hashed_on
    assert hashed_on and all(name.startswith('fingerprint') for name in hashed_on)
    checkpoint.wait(manager)  # joins the background work, then fingerprints the last step
    manager.close()
    assert all(checkpoint.has_fingerprint(str(tmp_path), s) for s in (1, 2, 3))
    assert all(checkpoint.verify(str(tmp_path), s) is None for s in (1, 2, 3))


def test_the_train_stream_resumes_at_any_batch():
    source = synthetic_source(32)
    preprocess = preprocessing.make_preprocess(synthetic_info(), train=True, normalization='none')
    whole = iter(pipelines.train_dataset(source, preprocess, batch_size=4, seed=0))
    batches = [next(whole) for _ in range(11)]  # into the second epoch
    resumed = iter(pipelines.train_dataset(source, preprocess, batch_size=4, seed=0, start_batch=9))
    for expected in batches[9:]:
        got = next(resumed)
        np.testing.assert_array_equal(got['image'], expected['image'])
        np.testing.assert_array_equal(got['label'], expected['label'])
    with pytest.raises(ValueError, match='start_batch must be an int >= 0, got -1'):
        pipelines.train_dataset(source, preprocess, batch_size=4, seed=0, start_batch=-1)


# --- End to end ------------------------------------------------------------------------------


def _smoke(data_dir, **overrides):
    return _with(smoke.get_config(), **{'dataset.data_dir': str(data_dir), **overrides})


def _records(workdir):
    return read_metrics(os.path.join(workdir, 'metrics.jsonl'))


@pytest.mark.slow
def test_smoke_run_then_resume_equals_an_uninterrupted_run(cifar10_data_dir, tmp_path):
    interrupted, straight = tmp_path / 'interrupted', tmp_path / 'straight'
    first = trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=4), str(interrupted))
    assert first['eval/num_examples'] == 72  # 72 = 4.5 eval batches: padded, counted exactly
    assert sorted(os.listdir(interrupted / 'checkpoints')) == ['3', '4']
    resumed = trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(interrupted))
    uninterrupted = trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(straight))
    assert resumed == uninterrupted
    # Rerunning a finished run trains nothing and reports the same metrics.
    records = len(_records(straight))
    assert trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(straight)) == uninterrupted
    assert len(_records(straight)) == records

    def losses(workdir, after):
        return {
            r['step']: r['train/loss']
            for r in _records(workdir)
            if 'train/loss' in r and r['step'] > after
        }

    assert losses(interrupted, 4) == losses(straight, 4)
    keys = set().union(*_records(straight))
    assert {
        'step',
        'train/loss',
        'train/top1_acc',
        'train/images_per_sec',
        'eval/loss',
        'eval/top1_acc',
        'eval/top5_acc',
        'eval/num_examples',
    } <= keys
    assert os.listdir(straight / 'tensorboard')


@pytest.mark.slow
def test_cli_rejects_bad_input_without_touching_the_workdir(tmp_path):
    workdir = tmp_path / 'run'
    cases = [
        (['--config.batch_size=12'], 'batch_size=12 is not divisible by the 8 devices'),
        (['--config.no_such_key=1'], 'no_such_key'),
        (['--config.total_steps=ten'], 'total_steps'),
        (['--config.dataset.name=cifar11'], "unknown dataset 'cifar11'"),
        (['--config.dataset.eval_split=validation'], "has no split 'validation'"),
    ]
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    for flags, message in cases:
        result = subprocess.run(
            [
                sys.executable,
                'train.py',
                '--config=configs/smoke.py',
                f'--workdir={workdir}',
                *flags,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode != 0
        assert message in result.stderr, result.stderr[-2000:]
        assert not workdir.exists()


@pytest.mark.parametrize('arg', ['resnet18', 'resnet50', 'resnet152,modern', 'plain34,modern'])
def test_imagenet_configs_validate(arg):
    from configs import imagenet

    config = imagenet.get_config(arg)
    config_lib.validate(config, device_count=8, process_count=1)
    if arg.endswith('modern'):
        assert config.dtype == 'bfloat16' and config.label_smoothing == 0.1
        assert config.model.zero_init_residual == arg.startswith('resnet')


def test_cifar100_config_builds_on_cifar10():
    from configs import cifar100

    config = cifar100.get_config('resnet56')
    assert config.dataset.name == 'cifar100' and config.total_steps == 64_000


@pytest.mark.slow
def test_evaluate_restores_prints_errors_and_exports(cifar10_data_dir, tmp_path):
    from resnet_jax import evaluation, serving

    workdir = tmp_path / 'run'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=3), str(workdir))
    state, run = evaluation.read_train_state(str(workdir), config=_smoke(cifar10_data_dir))
    model, step = run.model, run.step
    assert step == 3 and int(state.step) == 3
    path = tmp_path / 'weights.msgpack'
    serving.export_run(run, str(path))
    variables = serving.load_exported(str(path))
    images = jnp.zeros((2, 32, 32, 3))
    exported_logits, _ = rj.apply_model(model, variables, images, train=False)
    logits, _ = rj.apply_model(model, state.variables(), images, train=False)
    np.testing.assert_array_equal(exported_logits, logits)
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'resnet_jax',
            'evaluate',
            '--config=configs/smoke.py',
            f'--config.dataset.data_dir={cifar10_data_dir}',
            f'--workdir={workdir}',
            '--split=test[:100]',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'step 3: test[:100] top-1 error' in result.stdout and 'on 100 images' in result.stdout
    with pytest.raises(ValueError, match='checkpoint step 99 not in'):
        evaluation.read_run(str(workdir), step=99, config=_smoke(cifar10_data_dir))
    with pytest.raises(ValueError, match='no checkpoints in'):
        evaluation.read_run(str(tmp_path / 'empty'), config=_smoke(cifar10_data_dir))
    wrong_model = _smoke(cifar10_data_dir, **{'model.name': 'resnet32'})
    with pytest.raises(ValueError, match=r"of another network.*model.name='resnet20'"):
        evaluation.read_run(str(workdir), config=wrong_model)


@pytest.mark.slow
def test_evaluate_exports_what_it_evaluated_the_moving_average(cifar10_data_dir, tmp_path):
    from resnet_jax import evaluation, serving

    workdir = tmp_path / 'run'
    config = _smoke(cifar10_data_dir, total_steps=3, **{'optimizer.ema_decay': 0.5})
    trainer.train_and_evaluate(config, str(workdir))
    state, run = evaluation.read_train_state(str(workdir), config=config)
    result = evaluation.evaluate(run, 'test[:32]')
    assert run.step == 3 and state.ema is not None and run.averaged
    path = tmp_path / 'ema.msgpack'
    serving.export_run(run, str(path))
    exported = serving.load_exported(str(path))
    chex.assert_trees_all_equal(exported, jax.device_get(state.ema))
    assert not np.array_equal(
        exported['batch_stats']['stem_bn']['mean'],
        jax.device_get(state.batch_stats)['stem_bn']['mean'],
    )
    # What was printed is what the exported variables score.
    model = config_lib.create_model_from_config(config, num_classes=10)
    source, info = sources.open_split('cifar10_jpeg', 'test[:32]', str(cifar10_data_dir))
    preprocess = preprocessing.make_preprocess(info, train=False, data_dir=str(cifar10_data_dir))
    batch = next(iter(pipelines.eval_dataset(source, preprocess, batch_size=32)))
    images = preprocess.normalize(batch['image'])  # uint8 batches, normalised by the eval step
    logits, _ = rj.apply_model(model, exported, images, train=False)
    top1 = float(np.mean(np.argmax(logits, -1) == batch['label']))
    assert result['test[:32]/top1_acc'] == pytest.approx(top1)


# --- Extensions: docs/extending.md's worked examples ------------------------------------------


def _extending_example(name):
    """A class defined in docs/extending.md's last Python block, as the docs show it."""
    import pathlib

    text = (pathlib.Path(REPO) / 'docs' / 'extending.md').read_text()
    namespace: dict = {}
    exec(re.findall(r'```python\n(.*?)```', text, re.S)[-1], namespace)
    return namespace[name]


@pytest.mark.slow
def test_an_extra_action_runs_in_the_loop_and_writes_once_per_step(cifar10_data_dir, tmp_path):
    weight_norms = _extending_example('WeightNorms')
    config = _smoke(cifar10_data_dir, total_steps=4, **{'checkpoint_every_steps': 2})
    workdir = tmp_path / 'run'
    trainer.train_and_evaluate(config, str(workdir), extra_actions=[weight_norms(every=2)])
    records = [r for r in _records(workdir) if 'weights/head' in r]
    assert [r['step'] for r in records] == [2, 4]
    assert all(r['weights/stage1/block1/conv1'] > 0 for r in records)
    # Interrupted after step 4's records but before its checkpoint: written again, once.
    import shutil

    shutil.rmtree(workdir / 'checkpoints' / '4')
    trainer.train_and_evaluate(config, str(workdir), extra_actions=[weight_norms(every=2)])
    assert [r['step'] for r in _records(workdir) if 'weights/head' in r] == [2, 4]
