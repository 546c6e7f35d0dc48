"""Starting a run from weights made elsewhere (`config.init_from`, resnet_jax.pretrained)."""

import pathlib

import flax
import jax
import numpy as np
import pytest

import resnet_jax as rj
from configs import smoke
from resnet_jax import checkpoint, evaluation, pretrained, trainer, weights
from resnet_jax import config as config_lib

AKAMASTER = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'models' / 'akamaster_cifar10'
RESNET20 = AKAMASTER / 'resnet20.safetensors'


def _fresh(model):
    return jax.device_get(rj.init_variables(model, jax.random.key(7), (32, 32, 3)))


def _flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture
def resnet20_file():
    if not RESNET20.exists():
        pytest.fail(f'{RESNET20} is missing: the tests need the shared trained CIFAR nets')
    return str(RESNET20)


def test_a_torch_file_loads_every_variable(resnet20_file):
    model = rj.create_model('resnet20', num_classes=10)
    loaded = pretrained.load_variables(resnet20_file, model, _fresh(model))
    expected = weights.from_torch_cifar(weights.load_state_dict(resnet20_file), model)
    assert _flat(loaded).keys() == _flat(expected).keys()
    for key, value in _flat(expected).items():
        np.testing.assert_array_equal(_flat(loaded)[key], value)


def test_a_head_of_another_size_is_reinitialised_with_a_log_line(resnet20_file, caplog):
    model = rj.create_model('resnet20', num_classes=100)
    fresh = _fresh(model)
    loaded = pretrained.load_variables(resnet20_file, model, fresh)
    np.testing.assert_array_equal(
        loaded['params']['head']['kernel'], fresh['params']['head']['kernel']
    )
    source = weights.load_state_dict(resnet20_file)
    np.testing.assert_array_equal(
        loaded['params']['stem_conv']['kernel'], source['conv1.weight'].transpose(2, 3, 1, 0)
    )
    assert 'a head of 10 classes, this run 100: the head is re-initialised' in caplog.text


def test_weights_of_another_network_name_what_does_not_fit(resnet20_file):
    model = rj.create_model('resnet32', num_classes=10)
    with pytest.raises(
        ValueError, match=r'PyTorch CIFAR state_dict does not fit the model: missing'
    ):
        pretrained.load_variables(resnet20_file, model, _fresh(model))


@pytest.mark.parametrize(
    'make, message',
    [
        (
            lambda t: t / 'nothing.pth',
            "init_from '.*nothing.pth' does not exist; expected a weights",
        ),
        (lambda t: t, "is a directory without checkpoints/; expected a run's workdir"),
        (lambda t: (t / 'w.txt').write_text('x') and t / 'w.txt', 'is not a known weights file'),
    ],
)
def test_a_bad_init_from_is_refused_before_the_workdir_is_touched(tmp_path, make, message):
    config = smoke.get_config()
    config_lib.apply_overrides(
        config, {'init_from': str(make(tmp_path)), 'dataset.data_dir': str(tmp_path)}
    )
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


def test_a_run_starts_from_the_trained_net_and_resumes_from_its_own_checkpoint(
    tmp_path, cifar10_data_dir, resnet20_file
):
    """total_steps=0 evaluates the converted ResNet-20 as it is (18.97% test error on this JPEG
    copy) and saves it at step 0, bit for bit the file's; the rerun with more steps resumes from
    that checkpoint even when init_from no longer exists."""
    copy = tmp_path / 'resnet20.safetensors'
    copy.write_bytes(pathlib.Path(resnet20_file).read_bytes())
    config = smoke.get_config()
    config_lib.apply_overrides(
        config,
        {
            'dataset.data_dir': str(cifar10_data_dir),
            'dataset.normalization': 'imagenet',
            'dataset.eval_split': 'test[:512]',
            'init_from': str(copy),
            'total_steps': 0,
            'optimizer.learning_rate': 1e-3,
        },
    )
    result = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert result['eval/top1_acc'] > 0.75, result  # a net from the paper's init is at ~0.1
    assert checkpoint.committed_steps(str(tmp_path / 'run' / 'checkpoints')) == [0]
    state, _ = evaluation.read_train_state(str(tmp_path / 'run'), config=config)
    model = rj.create_model('resnet20', num_classes=10)
    expected = weights.from_torch_cifar(weights.load_state_dict(copy), model)
    for key, value in _flat(expected).items():
        np.testing.assert_array_equal(_flat(jax.device_get(state.variables()))[key], value)

    copy.unlink()
    config_lib.apply_overrides(config, {'total_steps': 2})
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert checkpoint.committed_steps(str(tmp_path / 'run' / 'checkpoints'))[-1] == 2


def test_an_exported_msgpack_loads_every_variable_and_a_bad_one_is_named(tmp_path):
    model = rj.create_model('resnet20', num_classes=10)
    source = _fresh(model)
    source['params'] = jax.tree.map(lambda x: x + 0.5, source['params'])  # not the fresh values
    source['batch_stats'] = jax.tree.map(lambda x: x + 0.25, source['batch_stats'])
    path = tmp_path / 'model.msgpack'
    path.write_bytes(flax.serialization.msgpack_serialize(source))
    loaded = pretrained.load_variables(str(path), model, _fresh(model))
    assert _flat(loaded).keys() == _flat(source).keys()
    for key, value in _flat(source).items():
        np.testing.assert_array_equal(_flat(loaded)[key], value)
    # Another head size is re-initialised, as for any source.
    model100 = rj.create_model('resnet20', num_classes=100)
    fresh100 = _fresh(model100)
    loaded = pretrained.load_variables(str(path), model100, fresh100)
    np.testing.assert_array_equal(
        loaded['params']['head']['bias'], fresh100['params']['head']['bias']
    )
    (tmp_path / 'junk.msgpack').write_bytes(b'\x01not msgpack')
    with pytest.raises(ValueError, match=r"^init_from '.*junk.msgpack': not a file written by"):
        pretrained.load_variables(str(tmp_path / 'junk.msgpack'), model, _fresh(model))
    (tmp_path / 'other.msgpack').write_bytes(flax.serialization.msgpack_serialize({'a': 1}))
    with pytest.raises(ValueError, match=r'holds no params/head/bias; expected a file written'):
        pretrained.load_variables(str(tmp_path / 'other.msgpack'), model, _fresh(model))


@pytest.mark.slow  # a Keras ResNet-50 written twice and read back
def test_a_keras_file_loads_every_variable(tmp_path, keras):
    keras_model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=5)
    model = rj.create_model('resnet50', num_classes=5, bn_epsilon=weights.KERAS_BN_EPSILON)
    fresh = jax.device_get(rj.init_variables(model, jax.random.key(0), (64, 64, 3)))
    expected = _flat(weights.from_keras(keras_model, model))
    for suffix in ('.keras', '.h5'):
        path = str(tmp_path / f'resnet50{suffix}')
        keras_model.save(path)
        loaded = _flat(pretrained.load_variables(path, model, fresh))
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(loaded[key], value)
        (tmp_path / f'broken{suffix}').write_bytes(b'not a keras file')
        with pytest.raises(ValueError, match=r'cannot read it as a Keras model'):
            pretrained.load_variables(str(tmp_path / f'broken{suffix}'), model, fresh)
    # The paper's BatchNorm epsilon is not Keras's: the message says which to use.
    paper = rj.create_model('resnet50', num_classes=5)
    with pytest.raises(ValueError, match=r'Keras BatchNorm uses epsilon=\[1.001e-05\]'):
        pretrained.load_variables(path, paper, fresh)


def test_non_finite_weights_of_every_kind_are_refused_naming_the_tensor(
    tmp_path, resnet20_file, monkeypatch
):
    """A NaN weight gives confident answers (XLA-CPU's ReLU makes it 0), and a run started
    from it reports a finite loss: init_from refuses it from a file of any kind or a run."""
    from safetensors.numpy import save_file

    model = rj.create_model('resnet20', num_classes=10)
    state = weights.load_state_dict(resnet20_file)
    state['layer2.0.bn1.running_var'] = np.full_like(state['layer2.0.bn1.running_var'], np.inf)
    save_file(state, str(tmp_path / 'inf.safetensors'))
    with pytest.raises(
        ValueError,
        match=r"^weights '.*inf\.safetensors': tensor 'layer2\.0\.bn1\.running_var' has 32 "
        r'non-finite values \(NaN/Inf\); expected finite weights$',
    ):
        pretrained.load_variables(str(tmp_path / 'inf.safetensors'), model, _fresh(model))

    exported = jax.tree.map(np.array, _fresh(model))  # writable copies
    exported['params']['stage1']['block1']['conv1']['kernel'][0, 0, 0, 0] = np.nan
    (tmp_path / 'nan.msgpack').write_bytes(flax.serialization.msgpack_serialize(exported))
    with pytest.raises(
        ValueError,
        match=r"^init_from '.*nan\.msgpack': tensor 'params/stage1/block1/conv1/kernel' has 1 "
        r'non-finite value',
    ):
        pretrained.load_variables(str(tmp_path / 'nan.msgpack'), model, _fresh(model))
    # Another run's checkpoint with a NaN: tests/test_checkpoint.py (readers refuse it).
