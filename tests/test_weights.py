"""Weight conversion: logit parity with torchvision and Keras, file loading, and every error.

The references are independent implementations (torchvision's and timm's ResNets in PyTorch,
Keras's in keras.applications); resnet_jax.parity builds them with random weights and
non-trivial BatchNorm statistics.
"""

import pathlib
import pickle

import jax
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax import parity, preprocessing, sources, weights

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
        match=r'fc\.weight has shape \(1000, 512\), expected \(10, 512\) '
        r'\(for params/head/kernel\)',
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
        ValueError, match=r'predictions has shape \(2048, 1000\), expected \(2048, 10\)'
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


# --- Trained CIFAR nets in PyTorch's CIFAR layout (../shared/models/akamaster_cifar10) ---------

AKAMASTER = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'models' / 'akamaster_cifar10'


def _akamaster(depth):
    if not AKAMASTER.exists():
        pytest.fail(f'{AKAMASTER} is missing: the tests need the shared trained CIFAR nets')
    return weights.load_state_dict(AKAMASTER / f'resnet{depth}.safetensors')


def _first_test_images(data_dir, count):
    """Test images 0..count-1 in the dataset's order, normalised as the weights were trained."""
    source, info = sources.open_split('cifar10_jpeg', f'test[:{count}]', str(data_dir))
    preprocess = preprocessing.make_preprocess(info, train=False, normalization='imagenet')
    return preprocess.normalize(np.stack([preprocess(source[i])['image'] for i in range(count)]))


def test_trained_cifar_nets_reproduce_their_pytorch_logits(cifar10_data_dir):
    """Their own PyTorch models' logits on 256 test images, from the converted weights: the
    layout mapping, option A's zero padding and the input normalisation all have to be right.
    Logits have std ~6; float32 convolutions in another order differ by ~1e-5 of that."""
    references = np.load(AKAMASTER / 'reference_logits_test0-255.npz')
    images = _first_test_images(cifar10_data_dir, 256)
    for depth in (20, 32, 44, 56):
        model = rj.create_model(f'resnet{depth}', num_classes=10)
        variables = weights.from_torch_cifar(_akamaster(depth), model)
        logits, _ = jax.jit(lambda v, x, m=model: rj.apply_model(m, v, x, train=False))(
            variables, images
        )
        expected = references[f'r{depth}']
        scale = float(np.std(expected))
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * scale)
        assert (np.argmax(logits, -1) == np.argmax(expected, -1)).mean() == 1.0


def test_torch_cifar_weights_name_every_missing_extra_and_misshaped_entry():
    state = _akamaster(20)
    model = rj.create_model('resnet20', num_classes=10)
    broken = dict(state)
    del broken['layer2.1.conv1.weight']
    broken['layer9.0.conv1.weight'] = broken['conv1.weight']
    with pytest.raises(ValueError, match=r'missing 1: layer2\.1\.conv1\.weight'):
        weights.from_torch_cifar(broken, model)
    extra = {**state, 'layer1.0.shortcut.0.weight': state['conv1.weight']}
    with pytest.raises(ValueError, match=r'1 unexpected entries.*layer1\.0\.shortcut\.0\.weight'):
        weights.from_torch_cifar(extra, model)
    with pytest.raises(
        ValueError,
        match=r'linear\.weight has shape \(100, 64\), expected \(10, 64\) '
        r'\(for params/head/kernel\)',
    ):
        weights.from_torch_cifar({**state, 'linear.weight': np.zeros((100, 64), np.float32)}, model)
    # Shapes are named as the file has them (OIHW), not in our layout.
    with pytest.raises(
        ValueError,
        match=r'conv1\.weight has shape \(32, 3, 3, 3\), expected \(16, 3, 3, 3\) '
        r'\(for params/stem_conv/kernel\)',
    ):
        weights.from_torch_cifar({**state, 'conv1.weight': np.zeros((32, 3, 3, 3))}, model)
    with pytest.raises(ValueError, match=r"need a CIFAR ResNet.*with the 'imagenet' stem"):
        weights.from_torch_cifar(state, rj.create_model('resnet18', num_classes=10))


def test_option_b_cifar_weights_use_their_shortcut_projections():
    """A CIFAR net with projections (option B): `layerS.0.shortcut.0|1` where the shape changes."""
    model = rj.create_model('resnet20', num_classes=10, shortcut='B')
    shapes = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), (32, 32, 3)))
    state = {}
    rng = np.random.default_rng(0)
    for name, shape in _torch_cifar_names(shapes).items():
        state[name] = rng.normal(size=shape).astype(np.float32)
    variables = weights.from_torch_cifar(state, model)
    kernel = variables['params']['stage2']['block1']['shortcut']['proj_conv']['kernel']
    np.testing.assert_array_equal(kernel, state['layer2.0.shortcut.0.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        variables['batch_stats']['stage3']['block1']['shortcut']['proj_bn']['var'],
        state['layer3.0.shortcut.1.running_var'],
    )


def _torch_cifar_names(shapes):
    """PyTorch CIFAR name -> PyTorch shape for every variable of `shapes`, written out here
    independently of the converter."""
    names = {}
    suffix = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [k.key for k in path]
        _, *module, last = keys
        if module == ['head']:
            name = 'linear.weight' if last == 'kernel' else 'linear.bias'
            shape = leaf.shape[::-1] if last == 'kernel' else leaf.shape
        else:
            if module[0] in ('stem_conv', 'stem_bn'):
                torch_module = {'stem_conv': 'conv1', 'stem_bn': 'bn1'}[module[0]]
            else:
                stage, block, *_, layer = module  # projections sit in a shortcut module
                layer = {'proj_conv': 'shortcut.0', 'proj_bn': 'shortcut.1'}.get(layer, layer)
                torch_module = f'layer{stage[5:]}.{int(block[5:]) - 1}.{layer}'
            if last == 'kernel':
                name, shape = f'{torch_module}.weight', tuple(np.array(leaf.shape)[[3, 2, 0, 1]])
            else:
                name, shape = f'{torch_module}.{suffix[last]}', leaf.shape
        names[name] = shape
    return names


def test_original_th_files_load_without_their_wrapper_and_dataparallel_prefix(tmp_path, torch):
    """akamaster's .th files: {'state_dict': {'module.conv1.weight': ...}, 'best_prec1': ...}."""
    state = {f'module.{k}': torch.from_numpy(v) for k, v in _akamaster(20).items()}
    torch.save({'state_dict': state, 'best_prec1': 91.78}, tmp_path / 'resnet20-12fca82f.th')
    loaded = weights.load_state_dict(tmp_path / 'resnet20-12fca82f.th')
    assert set(loaded) == set(_akamaster(20))
    model = rj.create_model('resnet20', num_classes=10)
    weights.from_torch_cifar(loaded, model)  # every entry used, none missing


# --- Non-finite and damaged files ------------------------------------------------------------


def _with_nan(state, name='layer1.0.conv1.weight'):
    return {**state, name: np.full_like(state[name], np.nan)}


def test_non_finite_weights_are_refused_naming_the_tensor_and_the_file(tmp_path, torch):
    """A NaN weight still gives confident answers (XLA-CPU's ReLU turns NaN into 0): every
    loader refuses it where it enters, naming the tensor as the source names it."""
    from safetensors.numpy import save_file

    state = _akamaster(20)
    bad = _with_nan(state)
    save_file(bad, str(tmp_path / 'nan.safetensors'))
    with pytest.raises(
        ValueError,
        match=r"^weights '.*nan\.safetensors': tensor 'layer1\.0\.conv1\.weight' has 2304 "
        r'non-finite values \(NaN/Inf\); expected finite weights$',
    ):
        weights.load_state_dict(tmp_path / 'nan.safetensors')
    inf = {k: torch.tensor(v) for k, v in state.items()}  # copies: `state` stays finite
    inf['linear.bias'][3] = float('inf')
    inf['conv1.weight'][0, 0, 0, 0] = float('-inf')
    torch.save({'state_dict': inf}, tmp_path / 'inf.pth')
    with pytest.raises(
        ValueError,
        match=r"^weights '.*inf\.pth': tensor 'conv1\.weight' has 1 non-finite value \(NaN/Inf\) "
        r'\(and 1 other tensors: linear\.bias\)',
    ):
        weights.load_state_dict(tmp_path / 'inf.pth')
    # A state dict handed to a converter directly: torch tensors or arrays.
    model = rj.create_model('resnet20', num_classes=10)
    with pytest.raises(ValueError, match=r"^PyTorch CIFAR state_dict: tensor 'layer1\.0\.conv1"):
        weights.from_torch_cifar(bad, model)
    with pytest.raises(ValueError, match=r"^PyTorch CIFAR state_dict: tensor 'conv1\.weight'"):
        weights.from_torch_cifar(inf, model)


def test_a_keras_model_with_a_nan_weight_is_refused_naming_the_weight(keras_resnet50):
    model = rj.create_model('resnet50', num_classes=1000, bn_epsilon=weights.KERAS_BN_EPSILON)
    layer = keras_resnet50.get_layer('conv2_block1_1_bn')
    original = layer.get_weights()
    layer.set_weights([original[0], np.full_like(original[1], np.nan), *original[2:]])
    try:
        with pytest.raises(
            ValueError,
            match=r"^Keras model: tensor 'conv2_block1_1_bn/beta' has 64 non-finite values",
        ):
            weights.from_keras(keras_resnet50, model)
    finally:
        layer.set_weights(original)


def _garbage(tmp_path, suffix, kind):
    """A weights file that is random bytes, empty, or the first half of a real one."""
    path = tmp_path / f'{kind}{suffix}'
    if kind == 'random':
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == 'empty':
        path.write_bytes(b'')
    else:
        whole = tmp_path / f'whole{suffix}'
        if suffix == '.safetensors':
            whole.write_bytes((AKAMASTER / 'resnet20.safetensors').read_bytes())
        else:
            import torch

            torch.save({k: torch.from_numpy(v) for k, v in _akamaster(20).items()}, whole)
        blob = whole.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    return path


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth', '.pt', '.bin'])
@pytest.mark.parametrize(
    'kind, message',
    [
        ('empty', r"weights file '.*empty\.\w+' is empty; expected a saved state dict"),
        (
            'random',
            r"cannot read '.*random\.\w+' as (safetensors|a weights-only torch checkpoint) "
            r'\(.+\); expected ',
        ),
        (
            'truncated',
            r"cannot read '.*truncated\.\w+' as (safetensors|a weights-only torch checkpoint) "
            r'\(.+\); expected ',
        ),
    ],
)
def test_a_damaged_weights_file_is_one_line_naming_it(tmp_path, torch, suffix, kind, message):
    del torch  # .pth files need it
    path = _garbage(tmp_path, suffix, kind)
    with pytest.raises(ValueError, match=message) as error:
        weights.load_state_dict(path)
    assert '\n' not in str(error.value)
    # Never torch's advice to load with weights_only=False (which would run the file's code).
    assert 'weights_only` set to `False' not in str(error.value)
