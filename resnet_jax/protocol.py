"""The paper's test protocols: 10-crop testing and fully-convolutional multi-scale testing.

    python -m resnet_jax evaluate --workdir=DIR --crops=10
    python -m resnet_jax evaluate --workdir=DIR --scales=224,256,384,480,640

Section 3.4: "In testing, for comparison studies we adopt the standard 10-crop testing. For
best results, we adopt the fully-convolutional form as in [41, 13], and average the scores at
multiple scales (images are resized such that the shorter side is in {224, 256, 384, 480,
640})." Each image gives several views; the model's softmax probabilities are averaged over
them, and top-1 / top-5 error and the loss are those of the averaged probabilities.

* `ten_crops`: the image's four corners and centre, then the horizontal flips of those five.
  ImageNet family: crops of 224 from the image resized to shorter side 256 (or in proportion
  for another `dataset.image_size`; the centre view is exactly what single-crop evaluation
  sees). CIFAR family: crops of the image's own size from the image zero-padded by 4 pixels
  (black, before normalisation), the frame the paper's pad-and-crop training augmentation
  draws from; the centre view is the image itself.
* `multi_scale_views`: the whole image resized to each shorter side s; the longer side is
  s plus the exact extra length rounded to a multiple of 32 (the networks' total stride), so
  the aspect ratio changes by at most 16 pixels on the longer side and an evaluation compiles
  a bounded number of shapes (one per rounded aspect ratio and scale). Square images stay
  square. A fixed-size dataset's per-pixel mean image is resized like the images.

The model runs in eval mode (the moving average where the run kept one), jitted once per view
shape, with the views of one shape batched together over the devices of this process. One
process only: it reads the whole split itself (several processes are refused with one error).
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import augment, metrics, models, preprocessing, sharding, sources

CROPS = (1, 10)  # 1: the single centre crop (resnet_jax.evaluation.evaluate); 10: the paper's
PAPER_SCALES = (224, 256, 384, 480, 640)
SCALE_MULTIPLE = 32  # the ResNets' total stride
_READ_CHUNK = 64  # images read and cut into views at a time


# --- Views ------------------------------------------------------------------------------------


def ten_crops(
    image: np.ndarray,
    resize: int | None = augment.IMAGENET_EVAL_RESIZE,
    crop: int | tuple[int, int] = augment.IMAGENET_CROP,
    pad: int = 0,
) -> np.ndarray:
    """The 10 views of 10-crop testing, (10, crop_h, crop_w, channels).

    Order: top-left, top-right, bottom-left, bottom-right, centre, then the horizontal flips of
    these five in the same order.

    Args:
      image: (height, width, channels).
      resize: the shorter side is resized to this first (None: kept as it is).
      crop: the views' size: an int for a square, or (height, width).
      pad: zeros added on every side first (CIFAR: 4, the training augmentation's padding).

    Raises:
      ValueError: if the (padded, resized) image is smaller than the crop.
    """
    if pad:
        image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    if resize is not None:
        image = augment.resize_shorter_side(image, resize)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    h, w = image.shape[:2]
    if ch > h or cw > w:
        raise ValueError(f'a {ch}x{cw} crop does not fit in a {h}x{w} image')
    top, left = (h - ch) // 2, (w - cw) // 2  # as augment.center_crop
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (top, left)]
    five = np.stack([image[y : y + ch, x : x + cw] for y, x in corners])
    return np.concatenate([five, five[:, :, ::-1]])


def scaled_size(height: int, width: int, scale: int, multiple: int = SCALE_MULTIPLE) -> tuple:
    """(height, width) of an image resized to shorter side `scale`: the longer side is `scale`
    plus the exact extra length rounded to the nearest multiple of `multiple`."""
    short, long = min(height, width), max(height, width)
    extra = long * scale / short - scale
    long = scale + multiple * math.floor(extra / multiple + 0.5)
    return (scale, long) if height <= width else (long, scale)


def multi_scale_views(
    image: np.ndarray, scales: Sequence[int], multiple: int = SCALE_MULTIPLE
) -> list[np.ndarray]:
    """The whole image resized to each shorter side in `scales` (`scaled_size`), in order."""
    h, w = image.shape[:2]
    return [_resize(image, scaled_size(h, w, s, multiple)) for s in scales]


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(size):
        return image
    # Area averaging when shrinking avoids aliasing; bilinear when enlarging (as augment).
    shrink = size[0] * size[1] < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (size[1], size[0]), interpolation=interpolation)


# --- Checking what was asked ------------------------------------------------------------------


def parse_scales(text: str) -> tuple[int, ...]:
    """'224,256,384' -> (224, 256, 384); '' -> ().

    Raises:
      ValueError: naming the value, unless it is distinct positive ints joined by commas.
    """
    expected = 'expected distinct positive ints (shorter sides in pixels) such as ' + ','.join(
        map(str, PAPER_SCALES)
    )
    if not isinstance(text, str):
        raise ValueError(f'scales={text!r} is not a list of image sizes; {expected}')
    if not text.strip():
        return ()
    scales = []
    for part in text.split(','):
        try:
            scale = int(part.strip())
        except ValueError:
            message = f'scales={text!r}: {part.strip()!r} is not an int; {expected}'
            raise ValueError(message) from None
        if scale < 1:
            raise ValueError(f'scales={text!r}: {scale} is not a positive size; {expected}')
        if scale in scales:
            raise ValueError(f'scales={text!r} repeats {scale}; {expected}')
        scales.append(scale)
    return tuple(scales)


def check_protocol(crops: Any, scales: Sequence[int]) -> None:
    """Raises ValueError unless (crops, scales) is one protocol: crops 1 or 10, and scales
    only with crops=1 (the paper uses 10-crop and multi-scale testing separately)."""
    if isinstance(crops, bool) or crops not in CROPS:
        raise ValueError(
            f'crops={crops!r} is not a test protocol; expected 1 (the single centre crop) or 10 '
            "(the paper's 10-crop testing)"
        )
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
        raise ValueError(f'scales={tuple(scales)!r}: expected positive ints (shorter sides)')
    if crops == 10 and scales:
        raise ValueError(
            f'crops=10 and scales={",".join(map(str, scales))} are two protocols (the paper '
            'uses 10-crop testing for comparisons and multi-scale fully-convolutional testing '
            'for its best results); give one of them'
        )


def describe(crops: int, scales: Sequence[int]) -> str:
    """How the result line names the protocol."""
    if scales:
        sides = ','.join(map(str, scales))
        return f'fully-convolutional, softmax averaged over shorter sides {sides}'
    if crops == 10:
        return '10-crop: corners, centre and their flips, softmax averaged'
    return 'single centre crop'


def views_function(
    info: sources.DatasetInfo, crops: int, scales: Sequence[int], crop_size: int
) -> Callable[[np.ndarray], list[np.ndarray]]:
    """image -> its views under the protocol, for the dataset's family (see the module doc)."""
    if scales:
        return lambda image: multi_scale_views(image, scales)
    if crops == 10 and info.family == 'cifar':
        return lambda image: list(ten_crops(image, None, image.shape[:2], augment.CIFAR_PAD))
    if crops == 10:  # 256 for 224 crops, in proportion for others (as the eval preprocessing)
        resize = round(augment.IMAGENET_EVAL_RESIZE * crop_size / augment.IMAGENET_CROP)
        return lambda image: list(ten_crops(image, resize, crop_size))
    raise ValueError(f'crops={crops} with no scales is the single-crop evaluation, not a protocol')


def views_per_batch(shape: Sequence[int], batch_size: int, area: int, devices: int) -> int:
    """How many views of `shape` make a batch: as many pixels as `batch_size` views of `area`
    pixels (at least one), rounded up to a multiple of `devices`."""
    views = max(1, batch_size * area // (shape[0] * shape[1]))
    return -(-views // devices) * devices


# --- Averaging ------------------------------------------------------------------------------


class _Normalize:
    """(views - mean) / std as float32; a per-pixel mean image is resized to the views' size
    (resizing is linear, so this is the normalised image resized). Views are numpy arrays or
    traced inside jit (their shape is static there, so the resized mean is a constant of the
    compiled function of that shape)."""

    def __init__(self, mean: Any, std: Any):
        self.mean = np.asarray(mean, np.float32)
        self.std = None if std is None else np.asarray(std, np.float32)
        self._means: dict[tuple, np.ndarray] = {}

    def __call__(self, views: np.ndarray) -> np.ndarray:
        mean = self.mean
        if mean.ndim == 3 and mean.shape[:2] != views.shape[1:3]:
            size = views.shape[1:3]
            if size not in self._means:
                self._means[size] = _resize(mean, size)
            mean = self._means[size]
        return augment.normalize(views, mean, self.std)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def average_softmax(
    logits_fn: Callable[[np.ndarray], Any],
    examples: Iterable[Sequence[np.ndarray]],
    num_examples: int,
    num_classes: int,
    *,
    batch_size: int | Callable[[tuple[int, ...]], int],
) -> np.ndarray:
    """The softmax of `logits_fn` averaged over each example's views, (num_examples, classes).

    Views of equal shape are stacked into batches of `batch_size` (an int, or a function of the
    view shape), across examples; the last batch of each shape is padded with zeros to the full
    size, so `logits_fn` sees one batch shape per view shape (one compilation under jit), and
    the padding's outputs are dropped.

    Args:
      logits_fn: (batch, h, w, c) views as they come (uint8 images) -> (batch, num_classes)
        logits; it normalises them itself.
      examples: each example's views, in order; there must be `num_examples` of them.

    Memory: the float64 sums of every example (ImageNet's 50k x 1000: 400 MB) and at most one
    unfinished batch of views per shape.
    """
    size_of = batch_size if callable(batch_size) else lambda shape: batch_size
    sums = np.zeros((num_examples, num_classes), np.float64)
    counts = np.zeros(num_examples, np.int64)
    pending: dict[tuple, list[tuple[int, np.ndarray]]] = {}

    def run(shape):
        items = pending.pop(shape)
        views = np.stack([view for _, view in items])
        padding = size_of(shape) - len(views)
        if padding > 0:
            views = np.concatenate([views, np.zeros((padding, *views.shape[1:]), views.dtype)])
        probabilities = _softmax(np.asarray(logits_fn(views))[: len(items)])
        np.add.at(sums, [index for index, _ in items], probabilities)

    index = -1
    for index, views in enumerate(examples):
        if index >= num_examples:
            raise ValueError(f'more than the {num_examples} examples announced')
        for view in views:
            pending.setdefault(view.shape, []).append((index, view))
            if len(pending[view.shape]) >= size_of(view.shape):
                run(view.shape)
        counts[index] = len(views)
    for shape in list(pending):
        run(shape)
    if index + 1 != num_examples or not counts.all():
        raise ValueError(f'{index + 1} examples with views, expected {num_examples}')
    return (sums / counts[:, None]).astype(np.float32)


def scores(probabilities: np.ndarray, labels: np.ndarray, prefix: str) -> dict[str, float]:
    """Top-1 / top-5 accuracy and the cross-entropy of averaged probabilities, as
    `resnet_jax.evaluation.evaluate` reports them (the loss clipped at float32's smallest
    normal, so a zero probability is a large number, not infinity)."""
    p = jnp.asarray(probabilities)
    y = jnp.asarray(labels, jnp.int32)
    label_p = np.take_along_axis(probabilities, np.asarray(labels)[:, None], axis=-1)[:, 0]
    loss = -np.log(np.maximum(label_p.astype(np.float64), np.finfo(np.float32).tiny))
    return {
        f'{prefix}/loss': float(loss.mean()),
        f'{prefix}/top1_acc': float(metrics.top_k_correct(p, y, 1).mean()),
        f'{prefix}/top5_acc': float(metrics.top_k_correct(p, y, 5).mean()),
        f'{prefix}/num_examples': float(len(labels)),
    }


# --- A checkpoint under a protocol ------------------------------------------------------------


def evaluate_protocol(
    run: Any, *, split: str, crops: int = 1, scales: Sequence[int] = ()
) -> dict[str, float]:
    """Metrics of `run` (`evaluation.Run`) over `split` under the protocol, with the keys of
    `evaluation.evaluate`: `{split}/top1_acc`, `top5_acc`, `loss`, `num_examples`.

    A batch holds `config.eval_batch_size` views of the single-crop input's size, or as many
    of a larger view as fit in the same number of pixels (rounded up to a multiple of the
    devices), so memory stays that of single-crop evaluation.

    Raises:
      ValueError: for a protocol other than 10-crop or multi-scale, several processes, or a
        split that cannot be read.
    """
    scales = tuple(scales)
    check_protocol(crops, scales)
    if crops == 1 and not scales:
        raise ValueError('crops=1 with no scales is single-crop evaluation: use evaluate()')
    if jax.process_count() > 1:
        raise ValueError(
            f'the {describe(crops, scales)} protocol runs in one process; this is one of '
            f'{jax.process_count()}'
        )
    config, model = run.config, run.model
    ds = config.dataset
    source, info = sources.open_split(ds.name, split, ds.data_dir)
    if not len(source):
        raise ValueError(f'split {split!r} of {ds.name} has no examples')
    preprocess = run.input.eval_preprocess()
    crop_size = preprocess.ctx.crop_size
    make_views = views_function(info, crops, scales, crop_size)
    mesh = sharding.data_mesh()
    devices = mesh.devices.size
    reference = (
        info.image_shape[0] * info.image_shape[1] if info.image_shape else crop_size * crop_size
    )

    batch_size = lambda shape: views_per_batch(shape, config.eval_batch_size, reference, devices)
    # uint8 views cross to the devices; the normalisation runs there, as in evaluation.
    normalize = _Normalize(preprocess.mean, preprocess.std)
    apply = jax.jit(lambda v, x: models.apply_model(model, v, normalize(x), train=False)[0])
    variables = run.variables
    batch_sharding = sharding.batch_sharding(mesh)
    logits_fn = lambda views: apply(variables, jax.device_put(views, batch_sharding))

    labels = np.zeros(len(source), np.int32)

    def load(i):
        image, labels[i] = preprocessing.check_record(source[i], info)
        return make_views(image)

    def examples():
        workers = min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(source), _READ_CHUNK):
                yield from pool.map(load, range(start, min(start + _READ_CHUNK, len(source))))

    probabilities = average_softmax(
        logits_fn,
        examples(),
        len(source),
        info.num_classes,
        batch_size=batch_size,
    )
    return scores(probabilities, labels, split)
