"""Your own images (`dataset.name='folder'`, resnet_jax.folder): real CIFAR-10 test images laid
out as class folders, both layouts, the held-out split, the bad inputs, and a torchvision file
fine-tuned on a folder, predicted from and resumed only on the same classes."""

import json
import re

import cv2
import numpy as np
import pytest

from configs import finetune
from resnet_jax import config as config_lib
from resnet_jax import folder, sources, trainer, workdir

CLASSES = ('airplane', 'cat', 'ship')


def _write(path, image, suffix='.jpg'):
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(suffix, image[..., ::-1] if image.ndim == 3 else image)
    assert ok
    path.with_suffix(suffix).write_bytes(encoded.tobytes())
    return path.with_suffix(suffix)


@pytest.fixture(scope='module')
def cifar_images(cifar10_data_dir):
    """{class name: [uint8 RGB 32x32 images]}: the first test images of three classes."""
    source, info = sources.open_split('cifar10_jpeg', 'test[:200]', str(cifar10_data_dir))
    images = {name: [] for name in CLASSES}
    for i in range(len(source)):
        name = info.class_names[source[i]['label']]
        if name in images and len(images[name]) < 12:
            images[name].append(np.asarray(source[i]['image']))
    return images


def _layout(root, cifar_images, per_class=12):
    for name, images in cifar_images.items():
        for i, image in enumerate(images[:per_class]):
            _write(root / name / f'{i:03d}', image)
    return root


def test_class_folders_are_the_classes_and_val_is_a_stable_held_out_share(tmp_path, cifar_images):
    root = _layout(tmp_path / 'photos', cifar_images)
    index = folder.scan(str(root))
    assert index.class_names == CLASSES
    train, val = index.splits['train'], index.splits['val']
    assert len(train) + len(val) == 36 and val
    assert {p for p, _ in train}.isdisjoint(p for p, _ in val)
    for path, label in train + val:
        assert f'/{CLASSES[label]}/' in path
    # Adding images never moves an old one to the other split.
    _write(root / 'cat' / 'new', cifar_images['cat'][0])
    again = folder.scan(str(root))
    assert set(val) <= set(again.splits['val']) and set(train) <= set(again.splits['train'])
    # Records are what the pipeline reads: uint8 RGB, the label, the file.
    source, info = sources.open_split('folder', 'train', str(root))
    record = source[0]
    assert record['image'].dtype == np.uint8 and record['image'].shape == (32, 32, 3)
    assert info.class_names == CLASSES and info.num_classes == 3 and info.image_shape is None
    assert info.splits == {'train': len(again.splits['train']), 'val': len(again.splits['val'])}


def test_images_in_folders_inside_a_class_are_read_in_a_fixed_order(tmp_path, cifar_images):
    """As torchvision's ImageFolder: CLASS/2023/a.jpg belongs to CLASS (once skipped without a
    word). The order is fixed (a folder's own files, then its sub-folders'), top-level images
    keep their split, and a non-image inside a nested folder is refused as at the top."""
    root = _layout(tmp_path / 'photos', cifar_images, per_class=8)
    flat = folder.scan(str(root))
    for name in CLASSES:
        for i, image in enumerate(cifar_images[name][:8]):
            _write(root / name / ('b' if i % 2 else 'a') / f'x{i}', image)
    _write(root / 'cat' / 'a' / 'deeper' / 'y', cifar_images['cat'][0])
    _write(root / 'cat' / '.hidden' / 'z', cifar_images['cat'][1])
    (root / 'cat' / '.DS_Store').write_bytes(b'\0')
    index = folder.scan(str(root))
    examples = index.splits['train'] + index.splits['val']
    assert len(examples) == 3 * 16 + 1
    cat = [p[len(str(root / 'cat')) + 1 :] for p, label in examples if label == 1]
    own = [f'{i:03d}.jpg' for i in range(8)]
    nested = ['a/x0.jpg', 'a/x2.jpg', 'a/x4.jpg', 'a/x6.jpg', 'a/deeper/y.jpg']
    expected = [*own, *nested, 'b/x1.jpg', 'b/x3.jpg', 'b/x5.jpg', 'b/x7.jpg']
    train_cat = [p[len(str(root / 'cat')) + 1 :] for p, c in index.splits['train'] if c == 1]
    assert sorted(cat) == sorted(expected)
    assert train_cat == [p for p in expected if p in train_cat]  # in that order
    assert set(flat.splits['val']) <= set(index.splits['val'])  # old images stay where they were
    assert set(flat.splits['train']) <= set(index.splits['train'])
    held_out = {p for p, _ in index.splits['val']}
    for path, label in examples:  # the hash of the path inside the class folder decides
        inside = path[len(str(root / CLASSES[label])) + 1 :]
        assert folder.in_val(f'{CLASSES[label]}/{inside}') == (path in held_out)
    assert folder.scan(str(root)) == index  # the same index every time
    (root / 'ship' / 'b' / 'notes.txt').write_text('x')
    with pytest.raises(ValueError, match=r"'.*ship/b/notes.txt' is not an image; a class folder"):
        folder.scan(str(root))


def test_train_and_val_folders_are_used_as_given(tmp_path, cifar_images):
    root = tmp_path / 'photos'
    for name in CLASSES:
        for i in range(3):
            _write(root / 'train' / name / f'{i}', cifar_images[name][i])
        _write(root / 'val' / name / 'v', cifar_images[name][5])
    index = folder.scan(str(root))
    assert index.class_names == CLASSES
    assert len(index.splits['train']) == 9 and len(index.splits['val']) == 3
    (root / 'val' / 'dog').mkdir()
    _write(root / 'val' / 'dog' / 'd', cifar_images['cat'][0])
    with pytest.raises(ValueError, match=r"val' has class folder\(s\) dog that train/ lacks"):
        folder.scan(str(root))


def test_grayscale_rgba_and_png_images_become_rgb(tmp_path, cifar_images):
    image = cifar_images['cat'][0]
    gray = _write(tmp_path / 'gray', cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), '.png')
    rgba = tmp_path / 'rgba.png'
    rgba.write_bytes(cv2.imencode('.png', np.dstack([image[..., ::-1], np.full((32, 32), 9)]))[1])
    png = _write(tmp_path / 'rgb', image, '.png')
    np.testing.assert_array_equal(folder.read_image(str(png)), image)  # lossless, RGB order
    np.testing.assert_array_equal(folder.read_image(str(rgba)), image)  # alpha dropped
    g = folder.read_image(str(gray))
    assert g.shape == (32, 32, 3) and (g[..., 0] == g[..., 2]).all()


def _bad_layouts():
    def empty_class(root, images):
        _layout(root, images)
        (root / 'dog').mkdir()
        return r"class folder '.*dog' holds no images; add some or remove it"

    def text_file(root, images):
        _layout(root, images)
        (root / 'cat' / 'notes.txt').write_text('x')
        return r"'.*cat/notes.txt' is not an image; a class folder holds only images"

    def not_an_image(root, images):
        _layout(root, images)
        (root / 'ship' / 'fake.jpg').write_text('<html>not a photo</html>')
        return r"'.*ship/fake.jpg' is not a readable image \(its first bytes"

    def one_class(root, images):
        _write(root / 'cat' / 'a', images['cat'][0])
        return r'has 1 class folder\(s\) \(cat\); expected one sub-folder per class, at least two'

    def missing(root, images):
        return r"folder dataset '.*photos' does not exist; expected dataset.data_dir"

    return [empty_class, text_file, not_an_image, one_class, missing]


@pytest.mark.parametrize('make', _bad_layouts(), ids=lambda f: f.__name__)
def test_a_bad_folder_is_one_line_naming_the_file_before_the_workdir_is_touched(
    tmp_path, cifar_images, make
):
    root = tmp_path / 'photos'
    message = make(root, cifar_images)
    with pytest.raises(ValueError, match=message):
        folder.scan(str(root))
    config = _finetune_config(root, '')  # from scratch: only the data is wrong
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


def test_a_damaged_image_is_named_when_read(tmp_path, cifar_images):
    root = _layout(tmp_path / 'photos', cifar_images)
    damaged = root / 'cat' / '000.jpg'
    damaged.write_bytes(damaged.read_bytes()[:40])  # a JPEG header, then nothing
    source, _ = sources.open_split('folder', 'train', str(root))
    examples = dict(folder.scan(str(root)).splits['train'])
    if str(damaged) not in examples:  # held out: read it from val instead
        source, _ = sources.open_split('folder', 'val', str(root))
    paths = [p for p, _ in source._examples]
    with pytest.raises(ValueError, match=re.escape(f"image '{damaged}' is not a readable image")):
        source[paths.index(str(damaged))]


def test_a_wrong_split_name_says_which_exist(tmp_path, cifar_images):
    root = _layout(tmp_path / 'photos', cifar_images)
    with pytest.raises(ValueError, match=r"has splits train, val; asked for 'train_45k'"):
        sources.open_split('folder', 'train_45k', str(root))
    with pytest.raises(ValueError, match=r'needs dataset.data_dir'):
        sources.open_split('folder', 'train', '')


def _finetune_config(root, init_from, **overrides):
    config = finetune.get_config('resnet18,folder')
    config_lib.apply_overrides(
        config,
        {
            'dataset.data_dir': str(root),
            'batch_size': 8,
            'eval_batch_size': 8,
            'total_steps': 2,
            'dataset.image_size': 64,
            'log_every_steps': 1,
            'eval_every_steps': 2,
            'checkpoint_every_steps': 2,
            'optimizer.warmup_steps': 1,
            'init_from': str(init_from) if init_from else '',
            **overrides,
        },
    )
    return config


@pytest.mark.slow  # resnet18 at 224x224 on the CPU
def test_a_torchvision_file_fine_tuned_on_a_folder_predicts_its_class_names(
    tmp_path, cifar_images, torch, run_process
):
    import torchvision

    torch.manual_seed(0)
    file = tmp_path / 'resnet18.pth'
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), file)
    root = _layout(tmp_path / 'photos', cifar_images, per_class=6)
    run = tmp_path / 'run'
    result = trainer.train_and_evaluate(_finetune_config(root, file), str(run))
    assert result['eval/num_examples'] == len(folder.scan(str(root)).splits['val'])
    assert json.loads((run / workdir.CLASS_NAMES_FILE).read_text()) == list(CLASSES)

    image = str(next((root / 'ship').iterdir()))
    printed = run_process(['-m', 'resnet_jax', 'predict', f'--workdir={run}', image])
    assert printed.returncode == 0, printed.stderr[-2000:]
    names = re.findall(r'%\s+(\S+)$', printed.stdout, re.MULTILINE)
    assert sorted(names) == sorted(CLASSES), printed.stdout  # top-5 of 3 classes: all three

    # The same run on a folder whose classes changed: refused, the run untouched.
    before = {p: p.read_bytes() for p in run.rglob('*') if p.is_file()}
    _write(root / 'dog' / 'd', cifar_images['cat'][0])
    with pytest.raises(ValueError, match=r"missing now: \[\], new: \['dog'\]"):
        trainer.train_and_evaluate(_finetune_config(root, file, total_steps=4), str(run))
    after = {p: p.read_bytes() for p in run.rglob('*') if p.is_file()}
    assert {p: b for p, b in after.items() if p.name != 'lock.json'} == {
        p: b for p, b in before.items() if p.name != 'lock.json'
    }
