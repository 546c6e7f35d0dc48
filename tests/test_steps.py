"""Tests of resnet_jax.steps (and the TrainState they carry): one trace, sharded equals single-
device, exact masked eval, BatchNorm spans, bfloat16 compute with float32 state, the moving
average.
"""

import collections
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from test_trainer import TINY_SHAPE, _tiny_batch, _tiny_setup, _with

import resnet_jax as rj
from configs import smoke
from resnet_jax import config as config_lib
from resnet_jax import (
    optim,
    sharding,
    steps,
)
from resnet_jax.train_state import create_train_state


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


@pytest.mark.slow
def test_the_moving_average_covers_params_and_batch_stats_and_is_what_eval_uses():
    model, _, _, _ = _tiny_setup()
    cfg = _with(smoke.get_config(), **{'optimizer.ema_decay': 0.5}).optimizer
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), TINY_SHAPE))
    tx, schedule = optim.create_optimizer(cfg, params['params'], total_steps=10, steps_per_epoch=1)
    state = create_train_state(model, tx, 0, TINY_SHAPE, ema=True)
    chex.assert_trees_all_equal(state.ema, state.variables())
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


@pytest.mark.slow
def test_batchnorm_spans_within_a_device_leave_a_handful_of_all_reduces():
    """Global statistics need an all-reduce per BatchNorm layer in every step (latency-bound
    across the hosts of a pod); spans of the per-device batch need none of them."""
    global_statistics = _all_reduces_in_a_resnet50_step(0)
    per_device_spans = _all_reduces_in_a_resnet50_step(2)
    assert global_statistics >= 53, global_statistics  # ResNet-50 has 53 BatchNorm layers
    assert per_device_spans <= 5, per_device_spans  # the gradients and the metrics


@pytest.mark.slow
def test_batchnorm_spans_that_straddle_devices_compile_to_collectives_in_every_layer():
    """What `bn_span_across_devices=True` buys: ResNet-20 on 8 devices (jax 0.10.2's XLA on
    this CPU; the counts docs/scaling.md quotes). 16 examples per device with spans of 32, as
    a v5e-256 at batch 4096 with the ImageNet configs' span: the two devices of a span
    all-reduce in every BatchNorm layer, forward and backward, as many all-reduces as global
    statistics. Spans off the device boundaries (12 per device, spans of 8): pairs of devices
    all-gather their examples and each computes both halves, twice the work."""
    model = rj.create_model('resnet20', num_classes=10)
    variables = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), (32, 32, 3)))
    bn_layers = len(jax.tree.leaves(variables['batch_stats'])) // 2  # a mean and a variance
    assert bn_layers == 19
    assert _collectives(_compiled_train_step('resnet20', 128, 0)) == {
        ('all-reduce', 8): 2 * bn_layers + 1
    }
    assert _collectives(_compiled_train_step('resnet20', 128, 16)) == {('all-reduce', 8): 1}
    assert _collectives(_compiled_train_step('resnet20', 128, 32)) == {
        ('all-reduce', 2): 2 * bn_layers,
        ('all-reduce', 4): 1,
        ('all-reduce', 8): 1,
    }
    uneven = _compiled_train_step('resnet20', 96, 8)
    assert _collectives(uneven) == {
        ('all-gather', 2): 2,
        ('all-reduce', 4): 1,
        ('all-reduce', 8): 1,
    }
    # The stem's output of both devices of a pair (24 examples) on each: the rest runs on it.
    assert re.search(r'= f32\[24,32,32,16\]\S* all-gather\(', uneven)


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


def _all_reduces_in_a_resnet50_step(bn_group_size):
    """All-reduce ops in the compiled ResNet-50 train step on 8 devices, batch 16 (2 each)."""
    counts = _collectives(_compiled_train_step('resnet50', 16, bn_group_size))
    return sum(n for (kind, _), n in counts.items() if kind == 'all-reduce')


def _compiled_train_step(name, batch_size, bn_group_size):
    """The HLO text of the compiled train step of `name` on 8 devices (32x32 images)."""
    config = smoke.get_config()
    model = rj.create_model(name, num_classes=10)
    shape = (32, 32, 3)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))
    tx, schedule = optim.create_optimizer(
        config.optimizer, params['params'], total_steps=100, steps_per_epoch=10
    )
    mesh = sharding.data_mesh()
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, 0, shape))
    shardings = sharding.state_shardings(abstract, mesh)
    batch = {
        'image': jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32),
        'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    step = jax.jit(
        steps.make_train_step(model, tx, schedule, steps.StepOptions(bn_group_size=bn_group_size)),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
    )
    return step.lower(abstract, batch).compile().as_text()


COLLECTIVE = re.compile(
    r'^\s*%\S+ = .*?\b(all-reduce|all-gather|collective-permute|reduce-scatter|all-to-all)'
    r'(?:-start)?\(',
    re.M,
)


def _collectives(hlo):
    """Collective ops of compiled HLO text, counted by (kind, devices in each replica group)."""
    counts = collections.Counter()
    for line in hlo.splitlines():
        if match := COLLECTIVE.match(line):
            counts[match.group(1), _group_size(line)] += 1
    return dict(counts)


def _group_size(line):
    """Devices in each replica group of one HLO collective; None where it has none
    (collective-permute names source-target pairs instead)."""
    if match := re.search(r'replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}', line):
        sizes = {axis: int(n) for axis, n in re.findall(r"'(\w+)'=(\d+)", match.group(1))}
        return math.prod(sizes[axis] for axis in re.findall(r"'(\w+)'", match.group(2)))
    if match := re.search(r'replica_groups=\[\d+,(\d+)\]', line):  # [groups,size]<=[devices]
        return int(match.group(1))
    if match := re.search(r'replica_groups=\{\{([\d,]*)\}', line):
        return len(match.group(1).split(','))
    return None
