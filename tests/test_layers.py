"""Tests of resnet_jax.layers: the shortcut options, strides, stems and stages of the paper's
blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models import (
    CIFAR_SHAPE,
    SMALL_IMAGENET_SHAPE,
    _abstract_variables,
    _identity_norm,
    _images,
    _intermediates,
    _module_paths,
    _plain_conv,
)

import resnet_jax as rj
from resnet_jax import layers


@pytest.mark.slow
def test_cifar_stages_run_at_32_16_8_with_widths_16_32_64():
    model = rj.create_model('resnet20', num_classes=10)
    variables = rj.init_variables(model, jax.random.key(0), CIFAR_SHAPE)
    flat = _intermediates(model, variables, _images(CIFAR_SHAPE))
    assert flat['stem_conv'].shape == (2, 32, 32, 16)
    assert flat['stage1'].shape == (2, 32, 32, 16)
    assert flat['stage2'].shape == (2, 16, 16, 32)
    assert flat['stage3'].shape == (2, 8, 8, 64)
    convs = [p for p in flat if p.endswith(('conv1', 'conv2')) or p == 'stem_conv']
    assert len(convs) + 1 == 20  # 6n+2 weighted layers: 19 convolutions and the head.


@pytest.mark.slow
def test_imagenet_stem_and_stages_follow_table1():
    model = rj.create_model('resnet50', num_classes=1000)
    variables = rj.init_variables(model, jax.random.key(0), SMALL_IMAGENET_SHAPE)
    flat = _intermediates(model, variables, _images(SMALL_IMAGENET_SHAPE))
    assert flat['stem_conv'].shape == (2, 32, 32, 64)  # 7x7/2
    assert flat['stage1'].shape == (2, 16, 16, 256)  # after the 3x3/2 max-pool
    assert flat['stage2'].shape == (2, 8, 8, 512)
    assert flat['stage3'].shape == (2, 4, 4, 1024)
    assert flat['stage4'].shape == (2, 2, 2, 2048)


@pytest.mark.parametrize('stride_on,strided', [('1x1', 'conv1'), ('3x3', 'conv2')])
@pytest.mark.slow
def test_stride_on_puts_the_stride_where_asked(stride_on, strided):
    model = rj.create_model('resnet50', num_classes=10, stride_on=stride_on)
    variables = rj.init_variables(model, jax.random.key(0), SMALL_IMAGENET_SHAPE)
    flat = _intermediates(model, variables, _images(SMALL_IMAGENET_SHAPE))
    block = 'stage2/block1'
    assert flat[f'{block}/{strided}'].shape[1:3] == (8, 8)
    other = {'conv1': 'conv2', 'conv2': 'conv1'}[strided]
    expected_other = (16, 16) if strided == 'conv2' else (8, 8)
    assert flat[f'{block}/{other}'].shape[1:3] == expected_other


def test_option_a_has_no_parameters_and_pads_with_zeros():
    params = _abstract_variables('resnet20', shortcut='A')['params']
    assert not any('shortcut' in p for p in _module_paths(params))

    shortcut = layers.Shortcut('A', features=8, strides=2, conv=None, norm=None)
    x = jnp.arange(2 * 4 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 4)
    y = shortcut.apply({}, x)
    assert y.shape == (2, 2, 2, 8)
    np.testing.assert_array_equal(y[..., 2:6], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(y[..., :2], 0)
    np.testing.assert_array_equal(y[..., 6:], 0)


def test_option_b_projects_only_where_the_shape_changes():
    params = _abstract_variables('resnet20', shortcut='B')['params']
    projected = {p.rsplit('/shortcut', 1)[0] for p in _module_paths(params) if 'shortcut' in p}
    assert projected == {'stage2/block1', 'stage3/block1'}
    params = _abstract_variables('resnet50')['params']  # B by default on ImageNet nets
    projected = {p.rsplit('/shortcut', 1)[0] for p in _module_paths(params) if 'shortcut' in p}
    assert projected == {f'stage{i}/block1' for i in range(1, 5)}


def test_option_c_projects_every_block():
    params = _abstract_variables('resnet20', shortcut='C')['params']
    projected = {p.rsplit('/shortcut', 1)[0] for p in _module_paths(params) if 'shortcut' in p}
    assert projected == {f'stage{s}/block{b}' for s in (1, 2, 3) for b in (1, 2, 3)}


def test_resnet_d_pools_then_projects_and_has_a_deep_stem():
    model = rj.create_model('resnet50d', num_classes=10)
    assert (model.stem, model.shortcut, model.stride_on) == ('deep', 'D', '3x3')
    params = jax.eval_shape(
        lambda: rj.init_variables(model, jax.random.key(0), SMALL_IMAGENET_SHAPE)
    )['params']
    # Three 3x3 stem convolutions at widths 32, 32, 64.
    assert [params[f'stem_conv{i}']['kernel'].shape for i in (1, 2, 3)] == [
        (3, 3, 3, 32),
        (3, 3, 32, 32),
        (3, 3, 32, 64),
    ]
    # The shortcut of a strided block: a 2x2 average pool, then a 1x1 projection at stride 1.
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 256))
    shortcut = layers.Shortcut('D', 512, 2, conv=_plain_conv, norm=_identity_norm)
    out, _ = shortcut.init_with_output(jax.random.key(2), x)
    pooled = x.reshape(2, 4, 2, 4, 2, 256).mean(axis=(2, 4))
    kernel = shortcut.init(jax.random.key(2), x)['params']['proj_conv']['kernel'][0, 0]
    np.testing.assert_allclose(out, pooled @ kernel, rtol=1e-5, atol=1e-5)
    # Where only the width changes (the first block), no pool; the same shape: the identity.
    same = layers.Shortcut('D', 256, 1, conv=_plain_conv, norm=_identity_norm)
    assert jnp.array_equal(same.init_with_output(jax.random.key(2), x)[0], x)
    # Any ImageNet net takes the new stem and shortcut as options.
    rj.create_model('resnet18', num_classes=10, stem='deep', shortcut='D')
