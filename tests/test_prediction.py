"""python -m resnet_jax predict: the trained ResNet-20's own probabilities for real test images
(from a weights file), a run's checkpoint with its class names, and bad input."""

import pathlib

import cv2
import jax
import numpy as np
import pytest
from test_reliability import _smoke

from resnet_jax import prediction, sources, trainer
from resnet_jax.folder import read_image

AKAMASTER = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'models' / 'akamaster_cifar10'


def _write_test_images(data_dir, folder, count):
    """Test images 0..count-1 as PNG files (lossless: the pixels the references saw)."""
    source, info = sources.open_split('cifar10_jpeg', f'test[:{count}]', str(data_dir))
    paths = []
    for i in range(count):
        path = folder / f'test{i}.png'
        cv2.imwrite(str(path), source[i]['image'][..., ::-1])  # OpenCV writes BGR
        paths.append(str(path))
    return paths, [info.class_names[source[i]['label']] for i in range(count)]


def test_a_weights_file_gives_the_trained_nets_own_probabilities(cifar10_data_dir, tmp_path):
    files, _ = _write_test_images(cifar10_data_dir, tmp_path, 8)
    predictor = prediction.from_weights(
        str(AKAMASTER / 'resnet20.safetensors'), 'resnet20', data_dir=str(cifar10_data_dir)
    )
    results = predictor([read_image(f) for f in files], top_k=10)
    reference = np.load(AKAMASTER / 'reference_logits_test0-255.npz')['r20'][:8]
    expected = np.asarray(jax.nn.softmax(reference, axis=-1))
    names = sources.dataset_info('cifar10_jpeg', str(cifar10_data_dir)).class_names
    for predictions, probabilities in zip(results, expected, strict=True):
        got = dict(predictions)  # most likely first
        assert next(iter(got)) == names[int(np.argmax(probabilities))]
        np.testing.assert_allclose([got[n] for n in names], probabilities, atol=1e-4)


def test_a_runs_checkpoint_predicts_with_its_class_names(cifar10_data_dir, tmp_path):
    """A run started from the trained weights (evaluation only: total_steps=0) predicts what
    the weights file predicts, with the run's normalisation and its dataset's class names."""
    workdir = tmp_path / 'run'
    weights = str(AKAMASTER / 'resnet20.safetensors')
    config = _smoke(
        cifar10_data_dir, init_from=weights, total_steps=0, **{'dataset.normalization': 'imagenet'}
    )
    trainer.train_and_evaluate(config, str(workdir))
    files, labels = _write_test_images(cifar10_data_dir, tmp_path, 2)
    gray = tmp_path / 'gray.jpg'  # another size, one channel: resized to 32x32, made RGB
    cv2.imwrite(str(gray), np.full((50, 70), 128, np.uint8))
    images = [read_image(f) for f in [*files, str(gray)]]

    from_run = prediction.from_workdir(str(workdir))(images, top_k=3)
    from_file = prediction.from_weights(weights, 'resnet20', data_dir=str(cifar10_data_dir))(
        images, top_k=3
    )
    assert from_run[0][0][0] == labels[0]  # test image 0: an automobile
    for run_top, file_top in zip(from_run, from_file, strict=True):
        assert [n for n, _ in run_top] == [n for n, _ in file_top]
        np.testing.assert_allclose([p for _, p in run_top], [p for _, p in file_top], atol=1e-5)
        probabilities = [p for _, p in run_top]
        assert probabilities == sorted(probabilities, reverse=True)


@pytest.mark.parametrize(
    'args, message',
    [
        ([], 'no images given; expected IMAGE paths after the flags'),
        (['--model=resnet20', 'IMG'], 'pass exactly one of --workdir=DIR and --weights=FILE'),
        (
            ['--weights=W', '--model=resnet20', 'IMG', 'NOTES'],
            "image 'NOTES' is not a readable image; expected a JPEG, PNG, BMP or WebP file",
        ),
        (
            # Once "99.69% frog": XLA-CPU's ReLU turns the NaNs into zeros.
            ['--weights=TMP/nan.safetensors', '--model=resnet20', 'IMG'],
            "weights 'TMP/nan.safetensors': tensor 'layer1.0.conv1.weight' has 2304 non-finite "
            'values (NaN/Inf); expected finite weights',
        ),
        (
            ['--weights=TMP/random.safetensors', '--model=resnet20', 'IMG'],
            "cannot read 'TMP/random.safetensors' as safetensors (SafetensorError: ",
        ),
        (
            ['--weights=TMP/random.msgpack', '--model=resnet20', 'IMG'],
            "weights 'TMP/random.msgpack': not a file written by --export (",
        ),
        (['--weights=W', '--model=resnet20', '--top_k=0', 'IMG'], '--top_k=0; expected a positive'),
        (
            ['--weights=W', '--model=resnet20', 'TMP'],
            "image 'TMP' is a directory; expected an image file",
        ),
        (['--workdir= ', 'IMG'], "--workdir ' ' is blank; expected a path"),
        (['--workdir=TMP', '--step=-1', 'IMG'], '--step=-1; expected a checkpoint step >= 0'),
        # Flags of the other source, once ignored without a word.
        (['--weights=W', '--model=resnet20', '--step=3', 'IMG'], '--step cannot be used with'),
        (
            ['--workdir=TMP', '--model=resnet56', '--normalization=channel', 'IMG'],
            '--model, --normalization cannot be used with --workdir (the run recorded them)',
        ),
    ],
    ids=[
        'no-images',
        'no-source',
        'not-an-image',
        'nan-weights',
        'garbage-safetensors',
        'garbage-msgpack',
        'top-k-0',
        'a-directory-as-image',
        'blank-workdir',
        'negative-step',
        'step-with-weights',
        'model-with-workdir',
    ],
)
def test_bad_input_is_one_error_line(run_process, tmp_path, args, message):
    from safetensors.numpy import load_file, save_file

    notes = tmp_path / 'notes.txt'
    notes.write_text('not an image')
    image = tmp_path / 'img.png'
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    weights = str(AKAMASTER / 'resnet20.safetensors')
    state = load_file(weights)
    state['layer1.0.conv1.weight'][:] = np.nan
    save_file(state, str(tmp_path / 'nan.safetensors'))
    for name in ('random.safetensors', 'random.msgpack'):
        (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(4096))
    before = sorted(tmp_path.iterdir())

    def filled(text):
        return (
            text.replace('NOTES', str(notes))
            .replace('IMG', str(image))
            .replace('=W', f'={weights}')
            .replace('TMP', str(tmp_path))
        )

    result = run_process(['-m', 'resnet_jax', 'predict', *map(filled, args)], cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f'error: {filled(message)}'), result.stderr
    assert [line for line in lines if 'error' in line] == lines[-1:], result.stderr
    assert not result.stdout  # no prediction printed
    assert sorted(tmp_path.iterdir()) == before


def test_bad_files_and_names_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"image '.*missing.png' does not exist"):
        read_image(str(tmp_path / 'missing.png'))
    with pytest.raises(ValueError, match=r"image '.*' is a directory; expected an image file"):
        read_image(str(tmp_path))
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    with pytest.raises(ValueError, match=r"image '.*empty.jpg' is not a readable image"):
        read_image(str(empty))
    weights = str(AKAMASTER / 'resnet20.safetensors')
    with pytest.raises(ValueError, match=r"weights '.*nope.th' do not exist"):
        prediction.from_weights(str(tmp_path / 'nope.th'), 'resnet20')
    with pytest.raises(ValueError, match=r"unknown model name 'resnet21'"):
        prediction.from_weights(weights, 'resnet21')
    with pytest.raises(ValueError, match=r"weights '.*notes.txt' are not a known kind"):
        (tmp_path / 'notes.txt').write_text('x')
        prediction.from_weights(str(tmp_path / 'notes.txt'), 'resnet20')
