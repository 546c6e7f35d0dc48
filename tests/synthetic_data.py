"""Synthetic data for tests: records whose images say which example they are, and small but
real prepared TFDS datasets written without TensorFlow."""

import numpy as np


def synthetic_source(n: int) -> list[dict]:
    """n records of 32x32x3 uint8 images; pixel channels 0/1 hold the index (low/high byte)."""
    records = []
    for i in range(n):
        image = np.zeros((32, 32, 3), np.uint8)
        image[..., 0], image[..., 1] = i % 256, i // 256
        records.append({'image': image, 'label': i % 10, 'id': f'ex{i}'})
    return records


def example_indices(images: np.ndarray) -> np.ndarray:
    """The index each (possibly normalised, never augmented) image of a batch encodes."""
    return images[:, 5, 5, 0].astype(np.int32) + 256 * images[:, 5, 5, 1].astype(np.int32)


def synthetic_info(splits: dict | None = None):
    """The DatasetInfo of `synthetic_source` data: a 32x32 'cifar'-family dataset."""
    from resnet_jax import datasets, sources

    spec = datasets.DatasetSpec('synthetic', 'cifar', (0, 0, 0), (1, 1, 1), 'pad_crop_flip')
    return sources.DatasetInfo('synthetic', 10, (32, 32, 3), splits or {'train': 0}, spec=spec)


def make_tfds_dataset(
    data_dir,
    name='svhn_cropped',
    splits=None,
    num_classes=10,
    image_shape=(32, 32, 3),
    seed=0,
    preserve_order=True,
):
    """Writes `<data_dir>/<name>/<version>/` with TFDS's own writer (no TF needed).

    If `name` is a registered TFDS builder (e.g. 'svhn_cropped'), a private
    unregistered subclass of it is prepared, so the files carry the registered
    builder's version, features, description, citation and module name, and
    `tfds.builder(name, data_dir=...)` / `tfds.data_source(...)` read them like
    a real download. Otherwise a fresh builder (version 1.0.0) with
    image/label/id features is prepared; TFDS then reads it back through its
    read-only builder from features.json.

    Images are random uint8 noise encoded as PNG with OpenCV (lossless, so the
    decoded arrays equal the returned ones). With `preserve_order=True`
    (disable_shuffling), record i of a split is example i; with False, TFDS
    orders the records by hashed key, as a real download does (find an example
    by its `id`).

    Returns {split: {'image': uint8 [N,H,W,C], 'label': int64 [N],
    'id': list[str]}} in generation order, plus 'path': the version directory.
    """
    import os
    import tempfile

    import cv2
    import numpy as np
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    splits = dict(splits or {'train': 64, 'test': 32})
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3 or image_shape[-1] not in (1, 3, 4):
        raise ValueError(f'image_shape must be (H, W, 1|3|4), got {image_shape}')

    # --- synthetic data (deterministic per seed) ---
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in splits.items():
        images = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        ids = [f'{split}_{i:06d}' for i in range(n)]
        data[split] = {'image': images, 'label': labels, 'id': ids}

    def encode_png(img):
        # TFDS's Image feature encodes numpy arrays via tf.image.encode_png (needs
        # TF), but passes bytes through unchanged, so encode with OpenCV here.
        c = img.shape[-1]
        if c == 1:
            img = img[..., 0]
        elif c == 3:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        else:
            img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
        ok, buf = cv2.imencode('.png', img)
        assert ok
        return buf.tobytes()

    def split_generators(self, dl_manager):
        del dl_manager
        return {s: self._generate_examples(s) for s in splits}

    def generate_examples(self, split):
        d = data[split]
        for i in range(len(d['id'])):
            ex = {'image': encode_png(d['image'][i]), 'label': int(d['label'][i])}
            if 'id' in d:
                ex['id'] = d['id'][i]
            yield i, ex

    try:
        base = tfds.builder_cls(name)
    except tfds.core.registered.DatasetNotFoundError:
        base = None

    if base is not None:
        base_info = base._info

        def info(self):
            i = base_info(self)
            i.as_proto.disable_shuffling = bool(preserve_order)
            return i

        attrs = dict(
            name=name,
            # Same module name as the registered builder -> same dataset_info.json.
            __module__=base.__module__,
            # Metadata (description/citation) read from the real builder's package.
            pkg_dir_path=base._get_pkg_dir_path(),
            # No checksums lookup (also avoids code_path -> importlib_resources).
            url_infos=None,
            _info=info,
            _split_generators=split_generators,
            _generate_examples=generate_examples,
        )
    else:

        def info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description='Synthetic test dataset.',
                features=tfds.features.FeaturesDict(
                    {
                        'image': tfds.features.Image(shape=image_shape),
                        'label': tfds.features.ClassLabel(num_classes=num_classes),
                        'id': tfds.features.Text(),
                    }
                ),
                supervised_keys=('image', 'label'),
                disable_shuffling=bool(preserve_order),
            )

        base = tfds.core.GeneratorBasedBuilder
        attrs = dict(
            name=name,
            VERSION=tfds.core.Version('1.0.0'),
            RELEASE_NOTES={'1.0.0': 'Synthetic.'},
            pkg_dir_path=None,
            url_infos=None,
            _info=info,
            _split_generators=split_generators,
            _generate_examples=generate_examples,
        )

    # Subclass without registering (the name is taken by the real builder).
    cls = type(f'_Synthetic_{name}', (base,), attrs, skip_registration=True)
    builder = cls(data_dir=os.fspath(data_dir), file_format='array_record')

    feats = builder.info.features
    if not set(feats.keys()) <= {'image', 'label', 'id'}:
        raise ValueError(f'{name}: unsupported features {list(feats.keys())}')
    if feats['label'].num_classes != num_classes:
        raise ValueError(
            f'{name} declares {feats["label"].num_classes} classes, asked for {num_classes}'
        )
    if tuple(feats['image'].shape) != image_shape:
        raise ValueError(
            f'{name} declares image shape {feats["image"].shape}, asked for {image_shape}'
        )
    if 'id' not in feats:
        for g in data.values():
            del g['id']

    was_active = tqdm_utils._active
    tqdm_utils.display_progress_bar(False)
    try:
        with tempfile.TemporaryDirectory() as dl_dir:  # keeps data_dir clean
            builder.download_and_prepare(download_dir=dl_dir)
    finally:
        tqdm_utils.display_progress_bar(was_active)

    out = dict(data)
    out['path'] = str(builder.data_dir)
    return out
