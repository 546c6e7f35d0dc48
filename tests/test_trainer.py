"""Tests of the trainer: steps, optimizer and schedules by config, checkpoints, configs, CLI."""

import os
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    steps,
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


@pytest.mark.slow
def test_train_step_does_not_retrace():
    model, tx, schedule, state = _tiny_setup()
    step = jax.jit(steps.make_train_step(model, tx, schedule), donate_argnums=0)
    state, _ = step(state, _tiny_batch(seed=0))
    state, metrics = step(state, _tiny_batch(seed=1))
    assert step._cache_size() == 1
    assert int(state.step) == 2
    assert set(metrics) == {
        'loss',
        'top1_acc',
        'top5_acc',
        'learning_rate',
        'grad_norm',
        'nonfinite',
    }


@pytest.mark.slow
def test_a_tiny_net_overfits_one_batch():
    model, tx, schedule, state = _tiny_setup('adam', 0.01)
    step = jax.jit(steps.make_train_step(model, tx, schedule))
    batch = _tiny_batch()
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics['loss']))
    assert losses[-1] < losses[0] / 2, losses


@pytest.mark.slow
def test_sharded_step_equals_the_single_device_step():
    model, tx, schedule, state = _tiny_setup()
    train_step = steps.make_train_step(model, tx, schedule)
    batch = _tiny_batch(16)
    one_state, one_metrics = jax.jit(train_step)(state, batch)

    mesh = sharding.data_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = jax.tree.map(lambda _: replicated, state)
    sharded = jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated),
    )
    eight_state, eight_metrics = sharded(state, sharding.global_batch(jax.device_get(batch), mesh))
    assert len(eight_state.params['head']['kernel'].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(eight_state), jax.tree.leaves(one_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(eight_metrics['loss'], one_metrics['loss'], rtol=1e-5)


@pytest.mark.slow
def test_eval_step_sums_only_real_examples():
    model, _, _, state = _tiny_setup()
    batch = {**_tiny_batch(8), 'mask': jnp.array([True] * 5 + [False] * 3)}
    sums = jax.jit(steps.make_eval_step(model))(state, batch)
    assert float(sums['num_examples']) == 5
    logits, _ = rj.apply_model(model, state.variables(), batch['image'][:5], train=False)
    expected = np.sum(np.argmax(logits, -1) == np.asarray(batch['label'][:5]))
    assert float(sums['top1_correct']) == expected


# --- Optimizers and schedules ----------------------------------------------------------------


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


@pytest.mark.parametrize(
    'setting, expected',
    [('auto', '{cache}/xla'), ('~/xla_here', '{home}/xla_here'), ('gs://b/xla', 'gs://b/xla')],
)
def test_the_compilation_cache_goes_where_the_config_says(monkeypatch, tmp_path, setting, expected):
    monkeypatch.setenv('RESNET_JAX_CACHE_DIR', str(tmp_path))
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    before = jax.config.jax_compilation_cache_dir
    try:
        path = trainer.enable_compilation_cache(setting)
        assert path == expected.format(cache=tmp_path, home=tmp_path / 'home')
        assert jax.config.jax_compilation_cache_dir == path
    finally:
        jax.config.update('jax_compilation_cache_dir', before)


def test_an_empty_compilation_cache_dir_turns_it_off():
    before = jax.config.jax_compilation_cache_dir
    assert trainer.enable_compilation_cache('') is None
    assert jax.config.jax_compilation_cache_dir == before


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
def test_the_moving_average_covers_params_and_batch_stats_and_is_what_eval_uses():
    model, _, _, _ = _tiny_setup()
    cfg = _with(smoke.get_config(), **{'optimizer.ema_decay': 0.5}).optimizer
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), TINY_SHAPE))
    tx, schedule = optim.create_optimizer(cfg, params['params'], total_steps=10, steps_per_epoch=1)
    state = create_train_state(model, tx, 0, TINY_SHAPE, ema=True)
    jax.tree.map(np.testing.assert_array_equal, state.ema, state.variables())
    assert create_train_state(model, tx, 0, TINY_SHAPE).ema is None
    step = jax.jit(steps.make_train_step(model, tx, schedule, steps.StepOptions(ema_decay=0.5)))
    new, _ = step(state, _tiny_batch())
    # ema = 0.5 * initial + 0.5 * new, for the BatchNorm statistics as for the parameters.
    expected = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, state.variables(), new.variables())
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new.ema, expected
    )
    assert not np.allclose(new.ema['batch_stats']['stem_bn']['mean'], 0.0)
    # Evaluation uses the average.
    batch = {**_tiny_batch(), 'mask': jnp.ones(8, bool)}
    with_ema = steps.make_eval_step(model)(new, batch)
    raw = steps.make_eval_step(model)(new.replace(ema=None), batch)
    averaged = steps.make_eval_step(model)(new.replace(ema=None, **new.ema), batch)
    assert float(with_ema['loss']) == float(averaged['loss']) != float(raw['loss'])


@pytest.mark.slow
def test_fsdp_rule_shards_large_arrays_and_gives_the_same_step():
    model, tx, schedule, state = _tiny_setup()
    mesh = sharding.data_mesh()
    fsdp = sharding.state_shardings(state, mesh, fsdp=True, fsdp_min_size=1024)
    specs = {
        '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): s.spec
        for path, s in jax.tree_util.tree_leaves_with_path(fsdp)
    }
    # 3x3x64x64 kernels (36,864 elements) split over the 8 devices along their largest axis.
    assert specs['params/stage3/block2/conv1/kernel'] == PartitionSpec(None, None, 'data', None)
    assert specs['params/stem_bn/scale'] == PartitionSpec()  # small: replicated
    replicated = sharding.state_shardings(state, mesh)
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(replicated))

    train_step = steps.make_train_step(model, tx, schedule)
    batch = sharding.global_batch(jax.device_get(_tiny_batch(16)), mesh)
    results = []
    for shardings in (replicated, fsdp):
        out = NamedSharding(mesh, PartitionSpec())
        step = jax.jit(
            train_step,
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
            out_shardings=(shardings, out),
        )
        results.append(step(jax.device_put(state, shardings), batch))
    (a, _), (b, _) = results
    assert b.params['stage3']['block2']['conv1']['kernel'].sharding.spec[2] == 'data'
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_bn_group_size_normalises_each_group_with_its_own_statistics():
    model, tx, schedule, state = _tiny_setup()
    batch = _tiny_batch(16)
    batch = {
        **batch,
        'image': batch['image'] * jnp.repeat(jnp.arange(1.0, 9.0), 2)[:, None, None, None],
    }
    # Per-device statistics on 8 devices: groups of 2, sharded so each stays on its device.
    mesh = sharding.data_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, state)
    grouped = jax.jit(
        steps.make_train_step(model, tx, schedule, steps.StepOptions(bn_group_size=2)),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, replicated),
    )
    new_state, metrics = grouped(state, sharding.global_batch(jax.device_get(batch), mesh))
    # Reference: each group of 2 run on its own.
    losses, stats = [], []
    for g in range(8):
        images, labels = batch['image'][2 * g : 2 * g + 2], batch['label'][2 * g : 2 * g + 2]
        logits, s = rj.apply_model(model, state.variables(), images, train=True)
        losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
        stats.append(s)
    np.testing.assert_allclose(metrics['loss'], np.mean(losses), rtol=1e-5)
    expected_stats = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *stats)
    for a, b in zip(
        jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(expected_stats), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # One group of the whole batch is the default (global statistics).
    whole, _ = jax.jit(
        steps.make_train_step(model, tx, schedule, steps.StepOptions(bn_group_size=16))
    )(state, batch)
    default, _ = jax.jit(steps.make_train_step(model, tx, schedule))(state, batch)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(default), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    config = smoke.get_config()
    with config.unlocked():
        config.bn_group_size = 5
    with pytest.raises(ValueError, match='bn_group_size=5 does not divide batch_size=16'):
        config_lib.validate(config, device_count=8, process_count=1)


def _all_reduces_in_a_resnet50_step(bn_group_size):
    """All-reduce ops in the compiled ResNet-50 train step on 8 devices, batch 16 (2 each)."""
    config = smoke.get_config()
    model = rj.create_model('resnet50', num_classes=10)
    shape = (32, 32, 3)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))
    tx, schedule = optim.create_optimizer(
        config.optimizer, params['params'], total_steps=100, steps_per_epoch=10
    )
    mesh = sharding.data_mesh()
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, 0, shape))
    shardings = sharding.state_shardings(abstract, mesh)
    batch = {
        'image': jax.ShapeDtypeStruct((16, *shape), jnp.float32),
        'label': jax.ShapeDtypeStruct((16,), jnp.int32),
    }
    step = jax.jit(
        steps.make_train_step(model, tx, schedule, steps.StepOptions(bn_group_size=bn_group_size)),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
    )
    hlo = step.lower(abstract, batch).compile().as_text()
    return len(re.findall(r'^\s*%\S+ = .*?\ball-reduce(?:-start)?\(', hlo, re.M))


@pytest.mark.slow
def test_batchnorm_spans_within_a_device_leave_a_handful_of_all_reduces():
    """Global statistics need an all-reduce per BatchNorm layer in every step (latency-bound
    across the hosts of a pod); spans of the per-device batch need none of them."""
    global_statistics = _all_reduces_in_a_resnet50_step(0)
    per_device_spans = _all_reduces_in_a_resnet50_step(2)
    assert global_statistics >= 53, global_statistics  # ResNet-50 has 53 BatchNorm layers
    assert per_device_spans <= 5, per_device_spans  # the gradients and the metrics


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


@pytest.mark.slow
def test_bfloat16_train_step_keeps_float32_state():
    config = _with(smoke.get_config(), dtype='bfloat16')
    model = config_lib.create_model_from_config(config, num_classes=10)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), TINY_SHAPE))
    tx, schedule = optim.create_optimizer(
        config.optimizer, params['params'], total_steps=10, steps_per_epoch=1
    )
    state = create_train_state(model, tx, 0, TINY_SHAPE)
    state, metrics = jax.jit(steps.make_train_step(model, tx, schedule))(state, _tiny_batch())
    floats = [
        x
        for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert np.isfinite(float(metrics['loss']))


def test_the_config_optimizer_section_is_the_optimizer_defaults():
    import dataclasses

    base = config_lib.base_config().optimizer.to_dict()
    assert base == dataclasses.asdict(optim.OptimizerConfig())
    assert base['name'] == 'momentum' and base['learning_rate'] == 0.1  # the paper's


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
    jax.tree.map(np.testing.assert_array_equal, exported, jax.device_get(state.ema))
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


def _extending_example(name):
    """A class defined in docs/extending.md's last Python block, as the docs show it."""
    import pathlib
    import re

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
