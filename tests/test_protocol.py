"""The paper's test protocols (resnet_jax.protocol): the views of 10-crop and multi-scale
testing on images whose pixels say where they came from, the averaging with a model whose
softmax is known, and a trained ResNet-20's run evaluated both ways, by the module and by hand.
"""

import math
import pathlib

import cv2
import jax
import numpy as np
import pytest

from configs import smoke
from resnet_jax import augment, evaluation, models, preprocessing, protocol, sources, trainer
from resnet_jax import config as config_lib

AKAMASTER = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'models' / 'akamaster_cifar10'


def _positions(height, width):
    """An image whose pixel (r, c) is (r, c, 7): every view says where it was cut from."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
    return np.stack([rows, cols, np.full_like(rows, 7)], -1).astype(np.uint8)


# --- Views ------------------------------------------------------------------------------------


def test_ten_crops_are_the_corners_the_centre_and_their_mirrors():
    image = _positions(6, 8)
    views = protocol.ten_crops(image, resize=None, crop=3)
    assert views.shape == (10, 3, 3, 3)
    # Top-left source pixel of each view: corners, then the centre ((6-3)//2, (8-3)//2).
    expected = [(0, 0), (0, 5), (3, 0), (3, 5), (1, 2)]
    for view, (y, x) in zip(views[:5], expected, strict=True):
        assert tuple(view[0, 0]) == (y, x, 7)
        assert tuple(view[-1, -1]) == (y + 2, x + 2, 7)
    for view, mirror, (y, x) in zip(views[5:], views[:5], expected, strict=True):
        assert tuple(view[0, 0]) == (y, x + 2, 7)  # the flip starts at the right edge
        np.testing.assert_array_equal(view, mirror[:, ::-1])


def test_imagenet_ten_crops_resize_to_256_and_the_centre_is_the_single_crop():
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    views = protocol.ten_crops(image)
    assert views.shape == (10, 224, 224, 3)
    resized = augment.resize_shorter_side(image, 256)
    assert resized.shape == (256, 341, 3)
    np.testing.assert_array_equal(views[0], resized[:224, :224])
    np.testing.assert_array_equal(views[3], resized[32:, 117:])
    np.testing.assert_array_equal(views[4], augment.resize_center_crop(image))


def test_cifar_ten_crops_come_from_the_image_padded_by_4_as_in_training():
    image = _positions(32, 32) + 1  # no zero pixel inside the image
    views = protocol.ten_crops(image, resize=None, crop=(32, 32), pad=4)
    top_left, bottom_right, centre = views[0], views[3], views[4]
    assert not top_left[:4].any() and not top_left[:, :4].any()  # 4 rows and columns of padding
    assert tuple(top_left[4, 4]) == (1, 1, 8)  # image pixel (0, 0)
    assert tuple(bottom_right[0, 0]) == (5, 5, 8)  # image pixel (4, 4)
    assert not bottom_right[-4:].any() and not bottom_right[:, -4:].any()
    np.testing.assert_array_equal(centre, image)
    np.testing.assert_array_equal(views[9], image[:, ::-1])


def test_multi_scale_views_keep_the_shorter_side_and_round_the_longer_to_32():
    image = np.full((300, 400, 3), 90, np.uint8)
    views = protocol.multi_scale_views(image, (224, 256))
    # 400 * 224 / 300 = 298.7: 74.7 more than 224, rounded to 64 -> 288 (exact 4:3 needs 298.7)
    # 400 * 256 / 300 = 341.3: 85.3 more than 256, rounded to 96 -> 352
    assert [v.shape for v in views] == [(224, 288, 3), (256, 352, 3)]
    assert all((v == 90).all() for v in views)  # resized, not padded
    portrait = protocol.multi_scale_views(image.transpose(1, 0, 2), (224,))
    assert portrait[0].shape == (288, 224, 3)
    assert protocol.multi_scale_views(np.zeros((32, 32, 3), np.uint8), (40,))[0].shape == (
        40,
        40,
        3,
    )
    for h, w in [(375, 500), (500, 333), (100, 1000), (480, 640)]:
        for s in protocol.PAPER_SCALES:
            size = protocol.scaled_size(h, w, s)
            assert min(size) == s and max(size) % 32 == s % 32
            assert abs(max(size) - max(h, w) * s / min(h, w)) <= 16


def test_views_function_follows_the_datasets_family():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    imagenet = sources.DatasetInfo('imagenet2012', 1000, None, {})
    views = protocol.views_function(imagenet, 10, (), 224)(photo)
    assert len(views) == 10
    np.testing.assert_array_equal(views[4], augment.resize_center_crop(photo))
    tiny = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cifar = sources.DatasetInfo('cifar10', 10, (32, 32, 3), {})
    views = protocol.views_function(cifar, 10, (), 224)(tiny)
    assert [v.shape for v in views] == [(32, 32, 3)] * 10
    np.testing.assert_array_equal(views[4], tiny)
    # Another crop size: the centre view is still what the eval preprocessing makes.
    preprocess = preprocessing.make_preprocess(
        imagenet, train=False, normalization='none', image_size=160
    )
    views = protocol.views_function(imagenet, 10, (), 160)(photo)
    assert views[0].shape == (160, 160, 3)
    single = augment.apply_host(preprocess.ops, photo, None, preprocess.ctx)
    np.testing.assert_array_equal(views[4], single)
    views = protocol.views_function(imagenet, 1, (224, 256), 224)(photo)
    assert [v.shape for v in views] == [(224, 288, 3), (256, 352, 3)]


def test_a_batch_holds_the_pixels_of_eval_batch_size_single_crops():
    assert protocol.views_per_batch((224, 224), 512, 224 * 224, 8) == 512
    # 512 * 224 * 224 / (224 * 288) = 398.2 -> 398 -> 400, a multiple of the 8 devices
    assert protocol.views_per_batch((224, 288), 512, 224 * 224, 8) == 400
    assert protocol.views_per_batch((40, 40), 16, 32 * 32, 8) == 16  # 10.24 -> 10 -> 16
    assert protocol.views_per_batch((4000, 4000), 16, 32 * 32, 1) == 1


# --- Averaging --------------------------------------------------------------------------------


def _p(v):
    """softmax((v, 0, -v)) by hand."""
    e = [math.exp(v), 1.0, math.exp(-v)]
    return np.array(e) / sum(e)


def test_the_softmax_is_averaged_over_each_images_views():
    calls = []

    def logits_fn(views):  # a "model": logits (m, 0, -m) of the view's mean pixel m
        calls.append(views.shape)
        m = views.mean(axis=(1, 2, 3))
        return np.stack([m, np.zeros_like(m), -m], -1)

    constant = lambda value, shape=(2, 2, 3): np.full(shape, value, np.uint8)
    examples = [
        [constant(1), constant(2), constant(0, (4, 2, 3))],
        [constant(3)],
        [constant(1, (4, 2, 3))],
    ]
    probabilities = protocol.average_softmax(logits_fn, examples, 3, 3, batch_size=2)
    expected = [(_p(1) + _p(2) + _p(0)) / 3, _p(3), _p(1)]
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)
    # One batch shape per view shape: the last batch of each is padded (its outputs dropped).
    assert sorted(calls) == [(2, 2, 2, 3), (2, 2, 2, 3), (2, 4, 2, 3)]
    with pytest.raises(ValueError, match='2 examples with views, expected 3'):
        protocol.average_softmax(logits_fn, examples[:2], 3, 3, batch_size=2)


def test_scores_are_those_of_the_averaged_probabilities():
    probabilities = np.array(
        [
            [0.6, 0.1, 0.1, 0.1, 0.05, 0.05],  # label 0: top-1
            [0.3, 0.4, 0.1, 0.1, 0.05, 0.05],  # label 0: second, so top-5 only
            [0.3, 0.25, 0.2, 0.15, 0.1, 0.0],  # label 5: sixth, neither
        ],
        np.float32,
    )
    result = protocol.scores(probabilities, np.array([0, 0, 5]), 'test')
    assert result['test/top1_acc'] == pytest.approx(1 / 3)
    assert result['test/top5_acc'] == pytest.approx(2 / 3)
    # A zero probability is clipped at float32's smallest normal: a large loss, not infinity.
    tiny = np.finfo(np.float32).tiny
    loss = (-math.log(0.6) - math.log(0.3) - math.log(tiny)) / 3
    assert result['test/loss'] == pytest.approx(loss)
    assert result['test/num_examples'] == 3


def test_a_per_pixel_mean_is_resized_to_the_views():
    normalize = protocol._Normalize(np.broadcast_to([10, 20, 30], (4, 4, 3)), None)
    out = normalize(np.full((2, 8, 6, 3), 50, np.uint8))
    assert out.shape == (2, 8, 6, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to([40, 30, 20], out.shape), atol=1e-4)


# --- Bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'crops, scales, message',
    [
        (3, '', r'crops=3 is not a test protocol; expected 1 \(the single centre crop\) or 10'),
        (1, 'abc', r"scales='abc': 'abc' is not an int; expected distinct positive ints"),
        (1, '0', r"scales='0': 0 is not a positive size"),
        (1, '224,-5', r"scales='224,-5': -5 is not a positive size"),
        (1, '224,,256', r"scales='224,,256': '' is not an int"),
        (1, '224,224', r"scales='224,224' repeats 224"),
        (10, '224', r'crops=10 and scales=224 are two protocols .* give one of them'),
    ],
)
def test_bad_protocols_are_one_clear_error(crops, scales, message):
    with pytest.raises(ValueError, match=message):
        protocol.check_protocol(crops, protocol.parse_scales(scales))


@pytest.mark.parametrize(
    'crops, scales, message',
    [
        (3, (), 'crops=3 is not a test protocol'),
        (10, (224,), 'crops=10 and scales=224 are two protocols'),
        (1, (0,), r'scales=\(0,\): expected positive ints'),
        (1, (), 'crops=1 with no scales is single-crop evaluation: use evaluate'),
    ],
)
def test_evaluate_protocol_checks_before_reading_anything(crops, scales, message):
    class NoRun:  # a protocol that is refused reads nothing of the run
        def __getattr__(self, name):
            raise AssertionError(f'read run.{name}')

    with pytest.raises(ValueError, match=message):
        protocol.evaluate_protocol(NoRun(), split='test', crops=crops, scales=scales)


# --- A trained ResNet-20 ----------------------------------------------------------------------

SPLIT = 'test[:16]'


def _config(data_dir):
    config = smoke.get_config()
    config_lib.apply_overrides(
        config,
        {
            'dataset.data_dir': str(data_dir),
            'init_from': str(AKAMASTER / 'resnet20.safetensors'),
            'total_steps': 0,  # evaluation only: the trained weights saved at step 0
            'dataset.normalization': 'imagenet',  # what the weights were trained with
            'dataset.eval_split': SPLIT,
        },
    )
    return config


@pytest.fixture(scope='module')
def trained_workdir(cifar10_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('protocol') / 'run'
    trainer.train_and_evaluate(_config(cifar10_data_dir), str(workdir))
    return workdir


@pytest.fixture(scope='module')
def ten_crop(trained_workdir, cifar10_data_dir):
    """(metrics, the run) of the trained run under 10-crop testing."""
    run = evaluation.read_run(str(trained_workdir), config=_config(cifar10_data_dir))
    return protocol.evaluate_protocol(run, split=SPLIT, crops=10), run


def _by_hand(run, data_dir, views_of):
    """Top-1, top-5 and loss of the softmax averaged over `views_of(image)` (uint8 views), each
    view normalised and run on its own, without the module."""
    source, _ = sources.open_split('cifar10_jpeg', SPLIT, str(data_dir))
    model = models.create_model('resnet20', num_classes=10)
    variables = run.variables
    apply = jax.jit(lambda x: models.apply_model(model, variables, x, train=False)[0])
    mean = 255 * np.asarray(preprocessing.IMAGENET_MEAN, np.float32)
    std = 255 * np.asarray(preprocessing.IMAGENET_STD, np.float32)
    top1, top5, loss = [], [], []
    for i in range(len(source)):
        label = int(source[i]['label'])
        probabilities = []
        for view in views_of(source[i]['image']):
            logits = np.asarray(apply(((view.astype(np.float32) - mean) / std)[None]))[0]
            p = np.exp(logits.astype(np.float64) - logits.max())
            probabilities.append(p / p.sum())
        p = np.mean(probabilities, axis=0)
        rank = int(np.sum(p > p[label]))
        top1.append(rank == 0)
        top5.append(rank < 5)
        loss.append(-math.log(p[label]))
    return np.mean(top1), np.mean(top5), np.mean(loss)


def _assert_matches(result, expected):
    top1, top5, loss = expected
    assert result[f'{SPLIT}/num_examples'] == 16
    assert result[f'{SPLIT}/top1_acc'] == pytest.approx(top1)
    assert result[f'{SPLIT}/top5_acc'] == pytest.approx(top5)
    assert result[f'{SPLIT}/loss'] == pytest.approx(loss, rel=1e-4)


def test_ten_crop_of_a_trained_net_is_the_average_computed_by_hand(ten_crop, cifar10_data_dir):
    result, run = ten_crop
    assert run.step == 0

    def ten_views(image):
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))  # black, as the training padding
        corners = [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)]
        five = [padded[y : y + 32, x : x + 32] for y, x in corners]
        return five + [view[:, ::-1] for view in five]

    _assert_matches(result, _by_hand(run, cifar10_data_dir, ten_views))
    assert result[f'{SPLIT}/top1_acc'] >= 12 / 16  # a 91.7% net on sensible views


@pytest.mark.slow
def test_multi_scale_of_a_trained_net(trained_workdir, cifar10_data_dir, ten_crop):
    run = ten_crop[1]
    # One scale, the images' own size: the fully-convolutional form is single-crop evaluation.
    one = protocol.evaluate_protocol(run, split=SPLIT, scales=(32,))
    single = evaluation.evaluate(run, SPLIT)
    for key in ('top1_acc', 'top5_acc', 'loss'):
        assert one[f'{SPLIT}/{key}'] == pytest.approx(single[f'{SPLIT}/{key}'], rel=1e-5)
    two = protocol.evaluate_protocol(run, split=SPLIT, scales=(32, 40))
    enlarge = lambda image: cv2.resize(image, (40, 40), interpolation=cv2.INTER_LINEAR)
    _assert_matches(two, _by_hand(run, cifar10_data_dir, lambda image: [image, enlarge(image)]))


def test_the_cli_prints_the_protocols_line(trained_workdir, ten_crop, run_process, tmp_path):
    result = ten_crop[0]
    out = run_process(
        [
            '-m',
            'resnet_jax',
            'evaluate',
            f'--workdir={trained_workdir}',
            f'--split={SPLIT}',
            '--crops=10',
        ]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    top1, top5 = result[f'{SPLIT}/top1_acc'], result[f'{SPLIT}/top5_acc']
    line = (
        f'step 0: {SPLIT} top-1 error {100 * (1 - top1):.2f}%, top-5 error '
        f'{100 * (1 - top5):.2f}%, loss {result[f"{SPLIT}/loss"]:.4f} on 16 images (10-crop'
    )
    assert line in out.stdout, out.stdout


@pytest.mark.parametrize(
    'flags, message',
    [
        (['--crops=3'], 'error: crops=3 is not a test protocol; expected 1'),
        (['--scales=224,abc'], "error: scales='224,abc': 'abc' is not an int"),
    ],
    ids=['crops', 'scales'],
)
def test_the_cli_refuses_bad_protocols_and_writes_nothing(
    trained_workdir, run_process, tmp_path, flags, message
):
    exported = tmp_path / 'w.msgpack'
    argv = ['-m', 'resnet_jax', 'evaluate', f'--workdir={trained_workdir}', f'--export={exported}']
    out = run_process([*argv, *flags])
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr[-2000:]
    assert not out.stdout and not exported.exists()
