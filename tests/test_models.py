"""Tests of resnet_jax.models: the paper's architectures, their options and their errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax import layers, models, weights

CIFAR_SHAPE = (32, 32, 3)
IMAGENET_SHAPE = (224, 224, 3)
SMALL_IMAGENET_SHAPE = (64, 64, 3)  # Big enough for all four stages, cheap on a CPU.


def _classes(name):
    return 1000 if name in rj.IMAGENET_MODELS else 10


def _shape(name):
    return IMAGENET_SHAPE if name in rj.IMAGENET_MODELS else CIFAR_SHAPE


@functools.cache
def _deep(name):
    """Over 100 layers: tracing one takes seconds, so its tests run in the full tier only."""
    return int(''.join(c for c in name if c.isdigit()) or 0) > 100


def _abstract_variables(name, **options):
    model = rj.create_model(name, num_classes=_classes(name), **options)
    return jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), _shape(name)))


def _images(shape, batch=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, *shape), jnp.float32)


def _intermediates(model, variables, images, *, train=False):
    """Outputs of every submodule's __call__, keyed by module path."""
    _, state = model.apply(
        variables,
        images,
        train=train,
        capture_intermediates=True,
        mutable=['intermediates', 'batch_stats'] if train else ['intermediates'],
    )
    flat = {}

    def walk(tree, path):
        for key, value in tree.items():
            if key == '__call__':
                flat['/'.join(path)] = value[0]
            else:
                walk(value, (*path, key))

    walk(state['intermediates'], ())
    return flat


def _blocks(flat):
    """Paths of the residual blocks (unrolled models)."""
    return sorted(p for p in flat if p.count('/') == 1 and p.split('/')[1].startswith('block'))


# --- The registry ----------------------------------------------------------------------------


def test_model_names_are_the_papers_and_resnet_d():
    assert set(rj.MODEL_NAMES) - {'resnet50d', 'resnet101d'} == {
        'resnet18',
        'resnet34',
        'resnet50',
        'resnet101',
        'resnet152',
        'plain18',
        'plain34',
        'resnet20',
        'resnet32',
        'resnet44',
        'resnet56',
        'resnet110',
        'resnet1202',
        'plain20',
        'plain32',
        'plain44',
        'plain56',
        'plain110',
    }
    assert set(rj.IMAGENET_MODELS) | set(rj.CIFAR_MODELS) == set(rj.MODEL_NAMES)


@pytest.mark.parametrize(
    'name',
    [pytest.param(n, marks=pytest.mark.slow) if _deep(n) else n for n in rj.MODEL_NAMES],
)
def test_output_shape_for_every_name(name):
    model = rj.create_model(name, num_classes=7)
    variables = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), _shape(name)))
    images = jax.ShapeDtypeStruct((3, *_shape(name)), jnp.float32)
    logits, stats = jax.eval_shape(
        lambda v, x: rj.apply_model(model, v, x, train=True), variables, images
    )
    assert logits.shape == (3, 7)
    assert logits.dtype == jnp.float32
    assert jax.tree.structure(stats) == jax.tree.structure(variables['batch_stats'])


@pytest.mark.parametrize(
    'name,options',
    [
        ('resnet20', {}),
        pytest.param('plain20', {}, marks=pytest.mark.slow),
        pytest.param('resnet50', {}, marks=pytest.mark.slow),
    ],
)
def test_forward_backward_runs_and_is_finite(name, options):
    model = rj.create_model(name, num_classes=5, **options)
    shape = CIFAR_SHAPE if name in rj.CIFAR_MODELS else SMALL_IMAGENET_SHAPE
    variables = rj.init_variables(model, jax.random.key(1), shape)
    images = _images(shape, batch=4)

    @jax.jit
    def loss_and_grads(params):
        def loss(params):
            logits, _ = rj.apply_model(model, {**variables, 'params': params}, images, train=True)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])

        return jax.value_and_grad(loss)(params)

    loss, grads = loss_and_grads(variables['params'])
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads))


# --- Parameter and FLOP counts against the paper and torchvision -----------------------------

# torchvision's exact counts (shortcut B, 1000 classes).
TORCHVISION_PARAMS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
}
# Paper Table 6 (CIFAR-10, option A), as printed.
TABLE6_PARAMS = {
    'resnet20': '0.27M',
    'resnet32': '0.46M',
    'resnet44': '0.66M',
    'resnet56': '0.85M',
    'resnet110': '1.7M',
    'resnet1202': '19.4M',
}
# Paper Table 1, multiply-adds per 224x224 image.
TABLE1_GMACS = {
    'resnet18': 1.8,
    'resnet34': 3.6,
    'resnet50': 3.8,
    'resnet101': 7.6,
    'resnet152': 11.3,
    'plain18': 1.8,
    'plain34': 3.6,
}


# --- Architecture ----------------------------------------------------------------------------


def _module_paths(params):
    paths = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        paths.add('/'.join(k.key for k in path[:-1]))
    return paths


def test_defaults_are_the_papers():
    assert rj.create_model('resnet20', num_classes=10).shortcut == 'A'
    assert rj.create_model('resnet50', num_classes=10).shortcut == 'B'
    assert rj.create_model('resnet50', num_classes=10).stride_on == '1x1'
    assert rj.create_model('plain20', num_classes=10).shortcut is None


@pytest.mark.parametrize('name', ['resnet20', pytest.param('resnet50', marks=pytest.mark.slow)])
def test_zero_init_residual_makes_every_branch_zero(name):
    model = rj.create_model(name, num_classes=10, zero_init_residual=True)
    shape = CIFAR_SHAPE if name == 'resnet20' else SMALL_IMAGENET_SHAPE
    variables = rj.init_variables(model, jax.random.key(0), shape)
    flat = _intermediates(model, variables, _images(shape), train=True)
    last_bn = 'bn2' if name == 'resnet20' else 'bn3'
    blocks = [p for p in flat if p.count('/') == 1 and '/block' in p]
    assert len(blocks) == sum(model.stage_sizes)
    for block in blocks:
        np.testing.assert_array_equal(flat[f'{block}/{last_bn}'], 0.0)
        # The branch is silent, so each block is relu(shortcut(x)).
        if f'{block}/shortcut' in flat:
            np.testing.assert_array_equal(flat[block], jax.nn.relu(flat[f'{block}/shortcut']))
    # Without the option the same branches are not zero.
    plain_init = rj.create_model(name, num_classes=10)
    flat = _intermediates(
        plain_init, rj.init_variables(plain_init, jax.random.key(0), shape), _images(shape)
    )
    assert np.any(flat[f'stage1/block1/{last_bn}'] != 0)


def test_plain_nets_have_no_shortcut():
    """Silence every branch: residual blocks still pass x on, plain blocks output zero."""
    plain = rj.create_model('plain20', num_classes=10)
    resnet = rj.create_model('resnet20', num_classes=10)
    variables = rj.init_variables(resnet, jax.random.key(0), CIFAR_SHAPE)
    assert jax.tree.structure(variables) == jax.tree.structure(
        rj.init_variables(plain, jax.random.key(0), CIFAR_SHAPE)
    )
    assert not any('shortcut' in p for p in _module_paths(variables['params']))

    def silence(path, x):
        names = [k.key for k in path]
        return jnp.zeros_like(x) if names[-2] == 'bn2' else x

    silenced = {
        'params': jax.tree_util.tree_map_with_path(silence, variables['params']),
        'batch_stats': variables['batch_stats'],
    }
    images = _images(CIFAR_SHAPE)
    plain_flat = _intermediates(plain, silenced, images)
    resnet_flat = _intermediates(resnet, silenced, images)
    for block in _blocks(plain_flat):
        np.testing.assert_array_equal(plain_flat[block], 0.0)
        assert np.any(resnet_flat[block] != 0)


# --- BatchNorm state -------------------------------------------------------------------------


@pytest.mark.slow
def test_running_statistics_change_only_in_train_mode():
    model = rj.create_model('resnet20', num_classes=10)
    variables = rj.init_variables(model, jax.random.key(0), CIFAR_SHAPE)
    images = _images(CIFAR_SHAPE, batch=4) * 3 + 1
    _, eval_stats = rj.apply_model(model, variables, images, train=False)
    assert eval_stats is variables['batch_stats']
    _, train_stats = rj.apply_model(model, variables, images, train=True)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), train_stats, variables['batch_stats'])
    assert all(jax.tree.leaves(changed))


def test_train_mode_uses_batch_statistics_and_eval_mode_running_ones():
    model = rj.create_model('resnet20', num_classes=10)
    variables = rj.init_variables(model, jax.random.key(0), CIFAR_SHAPE)
    images = _images(CIFAR_SHAPE, batch=4)
    shifted = {
        'params': variables['params'],
        'batch_stats': jax.tree.map(lambda x: x + 0.5, variables['batch_stats']),
    }
    train_a, _ = rj.apply_model(model, variables, images, train=True)
    train_b, _ = rj.apply_model(model, shifted, images, train=True)
    np.testing.assert_array_equal(train_a, train_b)
    eval_a, _ = rj.apply_model(model, variables, images, train=False)
    eval_b, _ = rj.apply_model(model, shifted, images, train=False)
    assert np.abs(eval_a - eval_b).max() > 1e-3


def test_bn_momentum_and_epsilon_reach_batchnorm():
    # momentum 0: the running mean becomes exactly the batch mean of the stem convolution.
    model = rj.create_model('resnet20', num_classes=10, bn_momentum=0.0, bn_epsilon=1e-3)
    variables = rj.init_variables(model, jax.random.key(0), CIFAR_SHAPE)
    images = _images(CIFAR_SHAPE, batch=4)
    flat = _intermediates(model, variables, images)
    _, stats = rj.apply_model(model, variables, images, train=True)
    np.testing.assert_allclose(
        stats['stem_bn']['mean'], flat['stem_conv'].mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
    )
    assert model.bn_epsilon == 1e-3
    x = flat['stem_conv']
    scale, bias = variables['params']['stem_bn']['scale'], variables['params']['stem_bn']['bias']
    expected = (x - 0.0) / np.sqrt(1.0 + 1e-3) * scale + bias  # init: mean 0, var 1
    np.testing.assert_allclose(flat['stem_bn'], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state():
    model = rj.create_model('resnet20', num_classes=10, dtype=jnp.bfloat16)
    variables = rj.init_variables(model, jax.random.key(0), CIFAR_SHAPE)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    images = _images(CIFAR_SHAPE, batch=4)
    logits, stats = rj.apply_model(model, variables, images, train=True)
    assert logits.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(stats)} == {jnp.dtype(jnp.float32)}
    flat = _intermediates(model, variables, images)
    assert flat['stem_conv'].dtype == jnp.bfloat16
    assert flat['stage3/block3/bn2'].dtype == jnp.bfloat16
    # Same weights in float32 give nearly the same logits.
    f32 = rj.create_model('resnet20', num_classes=10)
    logits32, _ = rj.apply_model(f32, variables, images, train=True)
    assert np.abs(logits - logits32).max() < 0.1 * np.abs(logits32).max() + 0.05


# --- Scanned blocks --------------------------------------------------------------------------


@pytest.fixture
def narrow_bottleneck_net():
    """A network registered by a test, as a user would add one (docs/extending.md), and removed
    afterwards so that the registry tables the docs show stay the library's own."""
    models.register_model(
        'narrow_bottleneck_net',
        family='imagenet',
        stage_sizes=(2, 2, 2, 2),
        block_cls=layers.Bottleneck,
        widths=(4, 8, 16, 32),
    )
    yield
    del models.MODELS['narrow_bottleneck_net']


def _float64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


@pytest.mark.parametrize(
    'name,options,shape',
    [
        ('resnet20', {}, CIFAR_SHAPE),
        ('plain20', {}, CIFAR_SHAPE),
        ('resnet20', {'shortcut': 'C', 'zero_init_residual': False}, CIFAR_SHAPE),
        # Bottlenecks with an ImageNet stem, at a sixteenth of resnet50's widths (float64
        # convolutions are slow); 48 pixels leave 2x2 maps in the last stage: at 1x1, train-mode
        # BatchNorm over 3 examples is too ill-conditioned even for float64.
        pytest.param(
            'narrow_bottleneck_net', {'stride_on': '3x3'}, (48, 48, 3), marks=pytest.mark.slow
        ),
    ],
)
@pytest.mark.slow
def test_scanned_and_unrolled_nets_agree(name, options, shape, request):
    """The two layouts compute the same function: checked in float64, where only rounding at
    1e-16 separates them. (In float32 the train-mode gradients of a batch of 3 differ by up to
    1.4% between machines: BatchNorm over 3 examples is badly conditioned, not wrong.)"""
    if name == 'narrow_bottleneck_net':
        request.getfixturevalue('narrow_bottleneck_net')
    with jax.enable_x64(True):
        options = {**options, 'dtype': jnp.float64}
        unrolled = rj.create_model(name, num_classes=10, **options)
        scanned = rj.create_model(name, num_classes=10, scan_blocks=True, **options)
        variables = _float64(rj.init_variables(unrolled, jax.random.key(3), shape))
        stacked = weights.to_scanned(variables)
        expected = jax.eval_shape(lambda: rj.init_variables(scanned, jax.random.key(0), shape))
        assert jax.tree.structure(stacked) == jax.tree.structure(expected)
        assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda x: x.shape, expected)
        images = _images(shape, batch=3).astype(jnp.float64)
        for train in (False, True):
            apply = jax.jit(rj.apply_model, static_argnames=('model', 'train'))
            logits_u, stats_u = apply(unrolled, variables, images, train=train)
            logits_s, stats_s = apply(scanned, stacked, images, train=train)
            assert logits_u.dtype == logits_s.dtype == jnp.float64
            scale = float(np.abs(logits_u).max())
            np.testing.assert_allclose(logits_s, logits_u, rtol=0, atol=1e-10 * scale)
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                weights.to_unrolled({'batch_stats': jax.device_get(stats_s)})['batch_stats'],
                jax.device_get(stats_u),
            )
        roundtrip = weights.to_unrolled(stacked)
        chex.assert_trees_all_equal(roundtrip, jax.device_get(variables))

        # Gradients too: on CPU the scanned blocks take their own backward convolutions
        # (xla_cpu.loop_conv_general_dilated), which must give the gradients JAX would.
        def loss(model, params, stats):
            logits, _ = rj.apply_model(
                model, {'params': params, 'batch_stats': stats}, images, train=True
            )
            return jnp.sum(logits * jnp.arange(logits.shape[-1]))

        grads_u = jax.jit(jax.grad(functools.partial(loss, unrolled)))(
            variables['params'], variables['batch_stats']
        )
        grads_s = jax.jit(jax.grad(functools.partial(loss, scanned)))(
            stacked['params'], stacked['batch_stats']
        )
        grads_s = weights.to_unrolled({'params': jax.device_get(grads_s)})['params']
        scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_u))
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * scale),
            grads_s,
            grads_u,
        )


def test_scanned_params_are_stacked_per_stage():
    variables = _abstract_variables('resnet56', scan_blocks=True)
    stage = variables['params']['stage2']
    assert set(stage) == {'block1', 'repeated'}
    assert stage['repeated']['block']['conv1']['kernel'].shape == (8, 3, 3, 32, 32)


# --- Errors ----------------------------------------------------------------------------------


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model name 'resnet19'.*resnet20.*plain110"):
        rj.create_model('resnet19', num_classes=10)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option 'shortcuts'.*shortcut, stride_on"):
        rj.create_model('resnet20', num_classes=10, shortcuts='A')


@pytest.mark.parametrize(
    'option,value',
    [
        ('shortcut', 'E'),
        ('shortcut', 'a'),
        ('stride_on', '2x2'),
        ('zero_init_residual', 1),
        ('dtype', jnp.int32),
        ('dtype', 'float33'),
        ('bn_momentum', 1.0),
        ('bn_momentum', '0.9'),
        ('bn_epsilon', 0.0),
        ('bn_epsilon', float('inf')),
        ('bn_epsilon', float('nan')),
        ('scan_blocks', 'yes'),
        ('input_channels', 0),
    ],
)
def test_invalid_option_values_are_named(option, value):
    with pytest.raises(ValueError, match=rf'option {option}=.*is invalid; expected'):
        rj.create_model('resnet20', num_classes=10, **{option: value})


@pytest.mark.parametrize('num_classes', [0, -1, 2.5, '10', True])
def test_invalid_num_classes(num_classes):
    with pytest.raises(ValueError, match='num_classes must be a positive int'):
        rj.create_model('resnet20', num_classes=num_classes)


def test_plain_nets_reject_shortcut_and_zero_init():
    no_shortcut = "plain20 is a plain net and has no shortcut; got shortcut='B'"
    with pytest.raises(ValueError, match=no_shortcut):
        rj.create_model('plain20', num_classes=10, shortcut='B')
    with pytest.raises(ValueError, match='plain34 is a plain net: zero_init_residual'):
        rj.create_model('plain34', num_classes=10, zero_init_residual=True)


@pytest.mark.parametrize(
    'images,message',
    [
        (np.zeros((32, 32, 3), np.float32), r'rank 4 .* got shape \(32, 32, 3\)'),
        (np.zeros((2, 32, 32, 1), np.float32), r'3 channels .* got shape \(2, 32, 32, 1\)'),
        (np.zeros((2, 3, 32, 32), np.float32), r'3 channels .* got shape \(2, 3, 32, 32\)'),
        (np.zeros((2, 32, 32, 3), np.uint8), 'floating point .* got dtype uint8'),
        ([[1.0]], 'images must be an array, got list'),
    ],
)
def test_bad_images_raise_a_clear_error(images, message):
    model = rj.create_model('resnet20', num_classes=10)
    variables = rj.init_variables(model, jax.random.key(0), CIFAR_SHAPE)
    with pytest.raises(ValueError, match=message):
        rj.apply_model(model, variables, images, train=False)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda v, x: rj.apply_model(model, v, x, train=True))(variables, images)


@pytest.mark.slow
def test_input_channels_option():
    model = rj.create_model('resnet20', num_classes=10, input_channels=1)
    variables = rj.init_variables(model, jax.random.key(0), (28, 28, 1))
    logits, _ = rj.apply_model(model, variables, jnp.ones((2, 28, 28, 1)), train=False)
    assert logits.shape == (2, 10)


@pytest.mark.parametrize('shape', [(32, 32), (32, 32, 3, 1), (0, 32, 3), (32.0, 32, 3)])
def test_bad_image_shape(shape):
    model = rj.create_model('resnet20', num_classes=10)
    with pytest.raises(ValueError, match=r'image_shape must be \(height, width, channels\)'):
        rj.init_variables(model, jax.random.key(0), shape)
    with pytest.raises(ValueError, match=r'image_shape must be \(height, width, channels\)'):
        rj.count_flops(model, shape)


@pytest.mark.slow
def test_batchnorm_over_a_sharded_batch_uses_global_statistics():
    # Under jit with the batch split over 8 devices, BN reduces over the global batch (SyncBN)
    # with no pmean: the sharded step equals the single-device one.
    assert jax.device_count() == 8  # tests/conftest.py simulates 8 CPU devices
    model = rj.create_model('resnet20', num_classes=10)
    variables = rj.init_variables(model, jax.random.key(0), CIFAR_SHAPE)
    images = _images(CIFAR_SHAPE, batch=8) * 2 + 0.5
    mesh = jax.make_mesh((8,), ('data',))
    sharded = jax.device_put(images, jax.NamedSharding(mesh, jax.P('data')))
    apply = jax.jit(lambda v, x: rj.apply_model(model, v, x, train=True))
    logits_1, stats_1 = apply(variables, images)
    logits_8, stats_8 = apply(variables, sharded)
    assert len(logits_8.sharding.device_set) == 8
    np.testing.assert_allclose(logits_8, logits_1, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats_8, stats_1
    )


# --- ResNet-D: docs/extending.md's worked example ---------------------------------------------


def _plain_conv(features, kernel_size, strides=(1, 1), **kwargs):
    import flax.linen as nn

    return nn.Conv(features, kernel_size, strides, use_bias=False, padding='VALID', **kwargs)


def _identity_norm(**kwargs):
    import flax.linen as nn

    class Identity(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x

    return Identity(**kwargs)
