"""Weight conversion: logit parity with torchvision and Keras, file loading, and every error.

The references are independent implementations (torchvision's and timm's ResNets in PyTorch,
Keras's in keras.applications); resnet_jax.parity builds them with random weights and
non-trivial BatchNorm statistics.
"""

import pickle

import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax import parity, weights

TOLERANCE = 1e-4  # max abs difference of float32 logits of order 1


@pytest.mark.slow
@pytest.mark.parametrize('name,reference,image_size,scan_blocks', parity.CASES)
def test_logits_match_the_reference(name, reference, image_size, scan_blocks, torch, keras):
    del torch, keras  # the references need both
    result = parity.parity(name, reference, image_size, scan_blocks)
    assert 0.5 < result['logit_std'] < 2.0  # logits of order 1, so the tolerance means something
    assert result['max_abs_diff'] < TOLERANCE


# --- Files -----------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def resnet18_state_dict(torch):
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


@pytest.fixture(scope='module')
def resnet18_model():
    return rj.create_model('resnet18', num_classes=1000)


def _assert_same_variables(a, b):
    flat_a = dict(weights._flatten(a))
    flat_b = dict(weights._flatten(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key])


def test_load_state_dict_from_pth_and_safetensors(
    tmp_path, resnet18_state_dict, resnet18_model, torch
):
    from safetensors.numpy import save_file

    direct = weights.from_torchvision(resnet18_state_dict, resnet18_model)
    pth = tmp_path / 'resnet18.pth'
    torch.save({'state_dict': resnet18_state_dict}, pth)  # a wrapped checkpoint
    st = tmp_path / 'resnet18.safetensors'
    save_file({k: v.numpy() for k, v in resnet18_state_dict.items()}, str(st))
    for path in (pth, st):
        loaded = weights.load_state_dict(path)
        _assert_same_variables(weights.from_torchvision(loaded, resnet18_model), direct)


class _Exploit:
    """Unpickling this would run code: create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_load_state_dict_never_executes_pickled_code(tmp_path, torch):
    del torch  # reading .pth files needs it
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'conv1.weight': _Exploit(str(marker))}, f)
    with pytest.raises(ValueError, match=r'cannot read .*evil\.pth.* as a weights-only torch'):
        weights.load_state_dict(path)
    assert not marker.exists()


def test_load_state_dict_bad_paths(tmp_path, torch):
    with pytest.raises(ValueError, match='does not exist or is not a file'):
        weights.load_state_dict(tmp_path / 'missing.pth')
    other = tmp_path / 'weights.h5'
    other.write_bytes(b'')
    with pytest.raises(ValueError, match=r'unknown extension; expected \.safetensors, \.pt'):
        weights.load_state_dict(other)
    not_a_dict = tmp_path / 'tensor.pt'
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match='holds a Tensor, expected a state dict'):
        weights.load_state_dict(not_a_dict)


# --- torchvision errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    'name,options,message',
    [
        ('resnet20', {}, "need an ImageNet ResNet .* with the 'cifar' stem"),
        ('resnet50', {}, r"stride on the 3x3 .* stride_on='3x3', got stride_on='1x1'"),
        ('resnet18', {'shortcut': 'C'}, r"shortcut='B', got shortcut='C'"),
        ('resnet18', {'bn_epsilon': 1e-3}, r'epsilon=1e-05: build the model with .* got 0.001'),
        ('plain18', {}, r"shortcut='B', got shortcut=None"),
    ],
)
def test_from_torchvision_rejects_a_model_of_another_shape(name, options, message):
    model = rj.create_model(name, num_classes=1000, **options)
    with pytest.raises(ValueError, match=message):
        weights.from_torchvision({}, model)


def test_from_torchvision_names_missing_and_unexpected_entries(
    resnet18_state_dict, resnet18_model, torch
):
    state = dict(resnet18_state_dict)
    del state['layer2.1.conv2.weight']
    with pytest.raises(ValueError, match=r'missing 1: layer2\.1\.conv2\.weight'):
        weights.from_torchvision(state, resnet18_model)
    state = {**resnet18_state_dict, 'extra.weight': torch.zeros(1)}
    with pytest.raises(ValueError, match=r'1 unexpected entries for this model: extra\.weight'):
        weights.from_torchvision(state, resnet18_model)
    # resnet18's weights in a resnet34 lack the extra blocks.
    resnet34 = rj.create_model('resnet34', num_classes=1000)
    with pytest.raises(
        ValueError,
        match=r'missing 80: layer1\.2\.bn1\.bias, .*, layer2\.2\.bn1\.running_mean, \.\.\. and 68',
    ):
        weights.from_torchvision(resnet18_state_dict, resnet34)
    with pytest.raises(ValueError, match='state_dict must be a mapping'):
        weights.from_torchvision([1, 2], resnet18_model)


def test_from_torchvision_names_shape_mismatches(resnet18_state_dict):
    model = rj.create_model('resnet18', num_classes=10)
    with pytest.raises(
        ValueError,
        match=r'fc\.weight has shape \(512, 1000\) \(as params/head/kernel\), expected \(512, 10\)',
    ):
        weights.from_torchvision(resnet18_state_dict, model)


def test_from_torchvision_accepts_numpy_arrays(resnet18_state_dict, resnet18_model):
    as_numpy = {k: v.numpy() for k, v in resnet18_state_dict.items()}
    _assert_same_variables(
        weights.from_torchvision(as_numpy, resnet18_model),
        weights.from_torchvision(resnet18_state_dict, resnet18_model),
    )


# --- Keras errors ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def keras_resnet50(keras):
    return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))


def test_from_keras_rejects_a_model_of_another_shape(keras_resnet50):
    eps = weights.KERAS_BN_EPSILON
    cases = [
        (
            rj.create_model('resnet50', num_classes=1000),
            r'epsilon=\[1\.001e-05\]: build .* got 1e-05',
        ),
        (
            rj.create_model('resnet50', num_classes=1000, bn_epsilon=eps, stride_on='3x3'),
            r"\(stride_on='1x1'\); got Bottleneck blocks with stride_on='3x3'",
        ),
        (
            rj.create_model('resnet18', num_classes=1000, bn_epsilon=eps),
            'bottleneck nets .* got BasicBlock blocks',
        ),
        (rj.create_model('resnet56', num_classes=10), 'need an ImageNet ResNet'),
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            weights.from_keras(keras_resnet50, model)


def test_from_keras_names_missing_layers(keras_resnet50):
    model = rj.create_model('resnet101', num_classes=1000, bn_epsilon=weights.KERAS_BN_EPSILON)
    with pytest.raises(
        ValueError,
        match=r'does not fit the model: missing 102: conv4_block7_1_bn, conv4_block7_1_conv',
    ):
        weights.from_keras(keras_resnet50, model)
    model = rj.create_model('resnet50', num_classes=10, bn_epsilon=weights.KERAS_BN_EPSILON)
    with pytest.raises(
        ValueError, match=r'predictions has shape \(2048, 1000\) .* expected \(2048, 10\)'
    ):
        weights.from_keras(keras_resnet50, model)


def test_from_keras_rejects_headless_and_v2_models(keras):
    model = rj.create_model('resnet50', num_classes=1000, bn_epsilon=weights.KERAS_BN_EPSILON)
    headless = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match='missing 1: predictions'):
        weights.from_keras(headless, model)
    v2 = keras.applications.ResNet50V2(weights=None, input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match='pre-activation ResNetV2'):
        weights.from_keras(v2, model)
    with pytest.raises(ValueError, match='expected a built Keras model, got dict'):
        weights.from_keras({}, model)


# --- Layouts ---------------------------------------------------------------------------------


def test_converters_fill_scanned_models(resnet18_state_dict):
    unrolled = rj.create_model('resnet18', num_classes=1000)
    scanned = rj.create_model('resnet18', num_classes=1000, scan_blocks=True)
    a = weights.from_torchvision(resnet18_state_dict, unrolled)
    b = weights.from_torchvision(resnet18_state_dict, scanned)
    assert b['params']['stage1']['repeated']['block']['conv1']['kernel'].shape == (1, 3, 3, 64, 64)
    _assert_same_variables(weights.to_unrolled(b), a)


def test_converters_are_reachable_from_the_package():
    assert rj.weights.from_torchvision is weights.from_torchvision
    assert rj.weights.from_keras is weights.from_keras
