"""The paper's Figure 7 measurement (resnet_jax.analysis): which layers, and their stds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax import analysis, weights


def _batches(images, batch=4, real=None):
    real = len(images) if real is None else real
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        mask = np.arange(start, start + len(chunk)) < real
        yield {'image': chunk, 'mask': mask}


def _variables(model, seed=0):
    variables = rj.init_variables(model, jax.random.key(seed), (16, 16, 3))
    # Non-trivial BatchNorm statistics and scales, so each layer has its own spread.
    return jax.tree.map(
        lambda x: x * jax.random.uniform(jax.random.key(seed + 1), x.shape, minval=0.5, maxval=2),
        variables,
    )


@pytest.mark.slow
def test_the_responses_are_each_3x3_layers_bn_output_and_their_std_is_exact():
    """resnet20: the stem's 3x3 and both 3x3 layers of each of its 9 blocks (the second one
    before the addition), in the network's order; std over images, positions and channels,
    computed in batches with padding examples masked out, equals the std of the whole."""
    model = rj.create_model('resnet20', num_classes=10)
    variables = _variables(model)
    images = np.asarray(jax.random.normal(jax.random.key(2), (10, 16, 16, 3)))
    padded = np.concatenate([images, np.full((2, 16, 16, 3), 100.0, np.float32)])
    layers, stds = analysis.layer_response_stds(model, variables, _batches(padded, real=10))
    assert len(layers) == 19
    assert layers[:3] == ['stem_bn', 'stage1/block1/bn1', 'stage1/block1/bn2']
    assert layers[-1] == 'stage3/block3/bn2'
    _, state = model.apply(
        variables, jnp.asarray(images), train=False, capture_intermediates=True, mutable=True
    )
    whole = state['intermediates']
    for layer, std in zip(layers, stds, strict=True):
        node = whole
        for part in layer.split('/'):
            node = node[part]
        np.testing.assert_allclose(std, np.std(np.asarray(node['__call__'][0])), rtol=1e-4)


@pytest.mark.slow
def test_scanned_nets_are_measured_in_their_unrolled_form():
    unrolled = rj.create_model('plain20', num_classes=10)
    variables = _variables(unrolled, seed=3)
    images = np.asarray(jax.random.normal(jax.random.key(4), (4, 16, 16, 3)))
    expected = analysis.layer_response_stds(unrolled, variables, _batches(images))
    scanned = rj.create_model('plain20', num_classes=10, scan_blocks=True)
    got = analysis.layer_response_stds(scanned, weights.to_scanned(variables), _batches(images))
    assert got[0] == expected[0]
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-4)


def test_the_summary_puts_plain_nets_first_and_gives_mean_and_median():
    responses = [
        analysis.Responses('resnet20', 'resnet20', ['a', 'b', 'c'], [1.0, 2.0, 6.0]),
        analysis.Responses('plain20', 'plain20', ['a', 'b'], [3.0, 5.0]),
    ]
    lines = analysis.summary_table(responses).splitlines()
    assert lines[2] == '| plain20 | plain20 | 2 | 4.000 | 4.000 |'
    assert lines[3] == '| resnet20 | resnet20 | 3 | 3.000 | 2.000 |'
