"""Tests of resnet_jax.counting: parameters and multiply-adds as the paper's Tables 1 and 6 count
them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models import (
    CIFAR_SHAPE,
    IMAGENET_SHAPE,
    TABLE1_GMACS,
    TABLE6_PARAMS,
    TORCHVISION_PARAMS,
    _abstract_variables,
    _classes,
    _deep,
    _shape,
)

import resnet_jax as rj


@pytest.mark.parametrize('name', sorted(TORCHVISION_PARAMS))
def test_imagenet_params_equal_torchvision(name):
    assert rj.count_params(_abstract_variables(name)['params']) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize(
    'name', [pytest.param(n, marks=pytest.mark.slow) if _deep(n) else n for n in TABLE6_PARAMS]
)
def test_cifar_params_match_table6(name):
    printed = TABLE6_PARAMS[name]
    decimals = len(printed.rstrip('M').split('.')[1])
    count = rj.count_params(_abstract_variables(name)['params'])
    assert f'{count / 1e6:.{decimals}f}M' == printed


@pytest.mark.parametrize(
    'plain,resnet',
    [('plain20', 'resnet20'), ('plain56', 'resnet56'), ('plain110', 'resnet110')],
)
def test_plain_cifar_nets_have_the_option_a_count(plain, resnet):
    count = rj.count_params(_abstract_variables(plain)['params'])
    assert count == rj.count_params(_abstract_variables(resnet)['params'])


def test_plain_imagenet_nets_have_the_resnet_count_minus_projections():
    # Option B's projections are the only parameters a plain net lacks: three 1x1 convs + BN.
    projections = sum(
        c_in * c_out + 2 * c_out for c_in, c_out in [(64, 128), (128, 256), (256, 512)]
    )
    for plain, resnet in [('plain18', 'resnet18'), ('plain34', 'resnet34')]:
        count = rj.count_params(_abstract_variables(plain)['params'])
        assert count == rj.count_params(_abstract_variables(resnet)['params']) - projections


def test_shortcut_options_add_exactly_their_projections():
    a = rj.count_params(_abstract_variables('resnet20', shortcut='A')['params'])
    b = rj.count_params(_abstract_variables('resnet20', shortcut='B')['params'])
    c = rj.count_params(_abstract_variables('resnet20', shortcut='C')['params'])
    proj = lambda c_in, c_out: c_in * c_out + 2 * c_out  # 1x1 conv without bias, BN scale+bias
    assert b - a == proj(16, 32) + proj(32, 64)
    # C projects in every one of the 9 blocks: 3 at width 16, 3 at 32, 3 at 64.
    assert c - a == (
        3 * proj(16, 16) + proj(16, 32) + 2 * proj(32, 32) + proj(32, 64) + 2 * proj(64, 64)
    )


@pytest.mark.parametrize(
    'name', [pytest.param(n, marks=pytest.mark.slow) if _deep(n) else n for n in TABLE1_GMACS]
)
def test_multiply_adds_within_5_percent_of_table1(name):
    model = rj.create_model(name, num_classes=1000)
    gmacs = rj.count_flops(model, IMAGENET_SHAPE) / 1e9
    assert abs(gmacs / TABLE1_GMACS[name] - 1) < 0.05, gmacs


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'resnet20'])
def test_multiply_adds_agree_with_xla_cost_analysis(name):
    # XLA skips kernel taps that fall on padding and adds the elementwise work: a few % apart.
    model = rj.create_model(name, num_classes=_classes(name))
    ours = rj.count_flops(model, _shape(name))
    variables = _abstract_variables(name)
    images = jax.ShapeDtypeStruct((1, *_shape(name)), jnp.float32)
    cost = (
        jax.jit(lambda v, x: rj.apply_model(model, v, x, train=False)[0])
        .lower(variables, images)
        .cost_analysis()
    )
    xla = cost['flops'] / 2
    assert 0.9 * ours < xla < 1.01 * ours


@pytest.mark.slow
def test_multiply_adds_follow_the_options():
    count = lambda name, **kw: rj.count_flops(
        rj.create_model(name, num_classes=1000, **kw), IMAGENET_SHAPE
    )
    v1 = count('resnet50')
    # "ResNet v1.5" strides on the 3x3: 4.1 GMACs as torchvision reports.
    assert abs(count('resnet50', stride_on='3x3') / 1e9 - 4.1) < 0.05
    assert count('resnet50', scan_blocks=True) == v1
    assert count('resnet50', shortcut='C') > v1
    # Multiply-adds scale with the pixels.
    small = rj.count_flops(rj.create_model('resnet20', num_classes=10), (16, 16, 3))
    assert small * 4 == pytest.approx(
        rj.count_flops(rj.create_model('resnet20', num_classes=10), CIFAR_SHAPE), rel=0.01
    )


def test_count_params_counts_scalars():
    assert rj.count_params({'a': np.zeros((2, 3)), 'b': {'c': np.zeros(4)}}) == 10
    assert rj.count_params({}) == 0
