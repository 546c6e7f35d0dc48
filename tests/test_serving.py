"""resnet_jax.serving and `evaluate --export`: StableHLO that runs with jax alone and ONNX that
onnxruntime runs, both with the normalisation inside and any batch size, giving the package's
own logits; the msgpack export of .msgpack; and bad destinations refused up front."""

import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_reliability import _smoke

import resnet_jax as rj
from resnet_jax import evaluation, preprocessing, serving, sources, trainer

AKAMASTER = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'models' / 'akamaster_cifar10'
TOLERANCE = 1e-4  # float32 logits; observed differences are about 1e-5 or less


def _model(name, size, **options):
    """A model with random variables, BatchNorm statistics included (so eval mode shows), drawn
    in numpy: `init_variables` would compile the initialisers, seconds on a small CPU."""
    model = rj.create_model(name, num_classes=10, **options)
    shapes = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), (size, size, 3)))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name == 'kernel':  # He-normal over the fan-in (a scan_blocks kernel has a block axis)
            fan_in = np.prod(leaf.shape[:-1]) // (leaf.shape[0] if len(leaf.shape) == 5 else 1)
            x = rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_in)
        elif name in ('scale', 'var'):
            x = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # bias, mean
            x = rng.normal(0, 0.1, leaf.shape)
        if path[0].key == 'params' and path[1].key == 'head':
            x = x / 10  # logits of the size a trained net's have (about 10), not 100s
        return x.astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def _images(batch, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), np.uint8)


def _reference(model, variables, batches, mean, std):
    """The package's logits of each uint8 batch, normalised as evaluation does (one compile)."""
    x = np.concatenate(batches).astype(np.float32) - mean
    x = x / std if std is not None else x
    logits = np.asarray(rj.apply_model(model, variables, x, train=False)[0])
    return np.split(logits, np.cumsum([len(b) for b in batches])[:-1])


# Loads and runs a .stablehlo file with nothing but jax and numpy, as a server would.
JAX_ONLY = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np

    artifact, inputs, outputs = sys.argv[1:]
    with open(artifact, 'rb') as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    images = np.load(inputs)
    logits = {k: np.asarray(exported.call(images[k])) for k in images.files}
    assert not {'resnet_jax', 'flax'} & set(sys.modules), 'more than jax was imported'
    np.savez(outputs, **logits)
    """
)


def test_stablehlo_runs_with_jax_alone_at_any_batch_size(run_process, tmp_path):
    model, variables = _model('resnet20', 32)
    # The paper's normalisation: the per-pixel mean subtracted, no std; so pixels stay on the
    # 0..255 scale and the first kernel is as much smaller as a net trained on them learns.
    mean = np.random.default_rng(1).uniform(100, 150, (32, 32, 3)).astype(np.float32)
    variables['params']['stem_conv']['kernel'] /= 64
    path = tmp_path / 'model.stablehlo'
    fmt = serving.export(str(path), model, variables, mean=mean, std=None, image_shape=(32, 32, 3))
    assert fmt == 'stablehlo'
    images = {'one': _images(1, 32), 'five': _images(5, 32, seed=1)}
    np.savez(tmp_path / 'in.npz', **images)
    out = run_process(['-c', JAX_ONLY, str(path), str(tmp_path / 'in.npz'), str(tmp_path / 'o')])
    assert out.returncode == 0, out.stderr[-3000:]
    logits = np.load(tmp_path / 'o.npz')
    references = _reference(model, variables, list(images.values()), mean, None)
    for (key, batch), expected in zip(images.items(), references, strict=True):
        assert logits[key].shape == (len(batch), 10) and logits[key].dtype == np.float32
        np.testing.assert_allclose(logits[key], expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow  # the first jax2onnx conversion of a process takes about 20 s
@pytest.mark.filterwarnings('ignore:jax.core.DropVar is deprecated:DeprecationWarning')
@pytest.mark.parametrize(
    'name, size, options',
    [
        ('resnet20', 32, {'scan_blocks': True}),
        ('resnet18', 32, {}),
        ('resnet20', 16, {'dtype': jnp.bfloat16}),
    ],
    ids=['resnet20-scan_blocks', 'resnet18-maxpool', 'resnet20-bfloat16'],
)
def test_onnx_gives_the_packages_logits_in_onnxruntime(tmp_path, name, size, options):
    """The float32 network's logits; a bfloat16 network is exported computing in float32
    (onnxruntime has no bfloat16 convolutions on CPU)."""
    import onnxruntime

    model, variables = _model(name, size, **options)
    mean = 255 * np.asarray(preprocessing.IMAGENET_MEAN, np.float32)
    std = 255 * np.asarray(preprocessing.IMAGENET_STD, np.float32)
    path = tmp_path / 'model.onnx'
    shape = (size, size, 3)
    assert serving.export(str(path), model, variables, mean=mean, std=std, image_shape=shape)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert [i.name for i in session.get_inputs()] == ['images']
    assert session.get_inputs()[0].type == 'tensor(uint8)'
    batches = [_images(1, size), _images(4, size, seed=1)]
    references = _reference(model.clone(dtype=jnp.float32), variables, batches, mean, std)
    for batch, expected in zip(batches, references, strict=True):
        (logits,) = session.run(['logits'], {'images': batch})
        np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)


# --- From a run: python -m resnet_jax evaluate --export ---------------------------------------

SPLIT = 'test[:16]'


@pytest.fixture(scope='module')
def run(cifar10_data_dir, tmp_path_factory):
    """(config, workdir) of a run holding the trained ResNet-20 at step 0 (no training), with
    the normalisation its weights were trained with and a moving average (the same weights)."""
    overrides = {'dataset.normalization': 'imagenet', 'optimizer.ema_decay': 0.9}
    weights = str(AKAMASTER / 'resnet20.safetensors')
    config = _smoke(cifar10_data_dir, init_from=weights, total_steps=0, **overrides)
    workdir = tmp_path_factory.mktemp('export') / 'run'
    trainer.train_and_evaluate(config, str(workdir))
    return config, workdir


def _test_images_and_expected_logits(config, workdir):
    """uint8 test images and the logits the package computes for them from the run."""
    state, run = evaluation.read_train_state(str(workdir), config=config)
    model = run.model
    ds = config.dataset
    source, info = sources.open_split(ds.name, SPLIT, ds.data_dir)
    preprocess = preprocessing.preprocess_of(ds, info, train=False)
    records = [source[i] for i in range(len(source))]
    images = np.stack([r['image'] for r in records])
    inputs = preprocess.normalize(np.stack([preprocess(r)['image'] for r in records]))
    variables = jax.device_get(state.eval_variables())
    logits = np.asarray(rj.apply_model(model, variables, inputs, train=False)[0])
    assert np.mean(np.argmax(logits, -1) == [r['label'] for r in records]) >= 0.75  # trained
    return images, logits, run


@pytest.mark.slow
def test_the_cli_exports_stablehlo_with_the_runs_normalisation(run, run_process, tmp_path):
    config, workdir = run
    path = tmp_path / 'model.stablehlo'
    argv = ['-m', 'resnet_jax', 'evaluate', f'--workdir={workdir}', f'--split={SPLIT}']
    out = run_process([*argv, f'--export={path}'])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        f'exported the moving average (what evaluation uses) to {path} as StableHLO '
        "(jax.export): uint8 images (batch, 32, 32, 3) -> logits, normalisation 'imagenet' inside"
    ) in out.stdout, out.stdout
    images, expected, _ = _test_images_and_expected_logits(config, workdir)
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    logits = np.asarray(exported.call(images))
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_a_runs_onnx_and_msgpack_exports_by_suffix(run, tmp_path):
    import onnxruntime

    config, workdir = run
    images, expected, restored = _test_images_and_expected_logits(config, workdir)
    written = serving.export_run(restored, str(tmp_path / 'model.onnx'))
    assert written.startswith('ONNX: uint8 images (batch, 32, 32, 3) -> logits')
    session = onnxruntime.InferenceSession(
        str(tmp_path / 'model.onnx'), providers=['CPUExecutionProvider']
    )
    (logits,) = session.run(None, {'images': images})
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)
    written = serving.export_run(restored, str(tmp_path / 'weights.msgpack'))
    assert written == 'msgpack variables (serving.load_exported)'
    loaded = serving.load_exported(str(tmp_path / 'weights.msgpack'))
    chex.assert_trees_all_equal(loaded, jax.device_get(restored.variables))


def test_the_cli_refuses_a_missing_folder_before_evaluating(run, run_process, tmp_path):
    _, workdir = run
    target = tmp_path / 'absent' / 'model.stablehlo'
    out = run_process(
        ['-m', 'resnet_jax', 'evaluate', f'--workdir={workdir}', f'--export={target}']
    )
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == f'error: export {str(target)!r}: folder {str(target.parent)!r} does not exist'
    assert not out.stdout  # nothing was evaluated


# --- Bad input, in this process ---------------------------------------------------------------


@pytest.mark.parametrize('package', ['jax2onnx', 'onnx'])
def test_onnx_without_its_packages_is_one_clear_error(monkeypatch, tmp_path, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    message = f"ONNX export needs {package}, which is not installed: pip install 'resnet_jax"
    with pytest.raises(ValueError, match=message.replace('[', r'\[')):
        serving.check_destination(str(tmp_path / 'model.onnx'))
    model, variables = _model('resnet20', 8)
    with pytest.raises(ValueError, match=message.replace('[', r'\[')):
        serving.onnx_bytes(model, variables, mean=np.zeros(3), std=None, image_shape=(8, 8, 3))
    assert serving.check_destination(str(tmp_path / 'model.stablehlo')) == 'stablehlo'


@pytest.mark.parametrize(
    'path, message',
    [
        ('absent/model.onnx', r"export '.*absent/model.onnx': folder '.*absent' does not exist"),
        ('s3://bucket/model.stablehlo', r's3:// is not supported'),
        ('model.pt', r"export '.*model.pt' has suffix '.pt'; expected .stablehlo, .onnx, .msgpack"),
        ('model', r"export '.*model' has no suffix; expected .stablehlo, .onnx, .msgpack"),
        ('run', r"export '.*run' is a directory; expected a file name in it, e.g. '.*run/model"),
        ('run/', r"export '.*run/' is a directory"),
        ('run.msgpack', r"export '.*run.msgpack' is a directory"),
        ('', r"export '' is empty; expected a path"),
    ],
)
def test_bad_destinations_are_refused(tmp_path, path, message):
    for folder in ('run', 'run.msgpack'):
        (tmp_path / folder).mkdir()
    path = path if '://' in path or not path else os.path.join(tmp_path, path)
    with pytest.raises(ValueError, match=message):
        serving.check_destination(path)
    assert sorted(p.name for p in tmp_path.rglob('*')) == ['run', 'run.msgpack']


def _in_a_read_only_mount(mount, code):
    """Runs Python `code` in a mount namespace of its own (as root, or as a user with
    unprivileged user namespaces) where `mount` (a folder or a file) is read-only: a real
    read-only place, which even root cannot write (a chmod does not stop root)."""
    namespace = ['unshare', '-m'] if os.geteuid() == 0 else ['unshare', '-rm']
    script = f'mount --bind {mount} {mount} && mount -o remount,bind,ro {mount} && exec "$@"'
    return subprocess.run(
        [*namespace, 'sh', '-c', script, 'sh', sys.executable, '-c', code],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_read_only_folder_or_file_is_refused(tmp_path, run_process):
    del run_process  # a subprocess: in a mount namespace of its own
    (tmp_path / 'ro').mkdir()
    (tmp_path / 'kept.msgpack').write_bytes(b'keep me')
    check = 'from resnet_jax import serving; serving.check_destination({!r})'
    folder = _in_a_read_only_mount(
        tmp_path / 'ro', check.format(str(tmp_path / 'ro' / 'model.msgpack'))
    )
    assert f"export '{tmp_path}/ro/model.msgpack': folder '{tmp_path}/ro' is not writable" in (
        folder.stderr
    ), folder.stderr[-2000:]
    target = tmp_path / 'kept.msgpack'
    file = _in_a_read_only_mount(target, check.format(str(target)))
    assert f"export '{target}' exists and is read-only; expected a writable target" in (
        file.stderr
    ), file.stderr[-2000:]
    assert target.read_bytes() == b'keep me'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['kept.msgpack', 'ro']


def test_formats_follow_the_suffix():
    assert serving.export_format('gs://b/m.stablehlo') == 'stablehlo'
    assert serving.export_format('m.ONNX') == 'onnx'
    assert serving.export_format('w.msgpack') == 'msgpack'
    for path in ('w.bin', 'weights', 'dir.onnx/w'):  # once silently msgpack
        with pytest.raises(ValueError, match=r'expected \.stablehlo, \.onnx, \.msgpack'):
            serving.export_format(path)


def test_a_mean_of_another_image_size_is_refused(tmp_path):
    model, variables = _model('resnet20', 8)
    with pytest.raises(ValueError, match=r'mean of shape \(32, 32, 3\) does not fit images'):
        serving.stablehlo_bytes(
            model, variables, mean=np.zeros((32, 32, 3)), std=None, image_shape=(8, 8, 3)
        )
