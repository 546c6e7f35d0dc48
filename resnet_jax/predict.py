"""The most likely classes of your own images, from a run or from a weights file.

    python -m resnet_jax.predict --workdir=DIR [--step=N] IMAGE [IMAGE ...]
    python -m resnet_jax.predict --weights=FILE --model=resnet20 [--dataset=cifar10_jpeg] \
        [--normalization=imagenet] IMAGE [IMAGE ...]

With `--workdir`, the run's checkpoint (the latest, or `--step`) is restored with its recorded
config: the weights it evaluates with (the moving average where the run kept one), its input
normalisation, its dataset's eval preprocessing and class names. With `--weights`, a PyTorch
state dict (.pth/.th/.safetensors, converted as `config.init_from` converts it) or a file written
by `evaluate --export` (.msgpack); the class names are the dataset's when it is prepared under
`--data_dir`, else class numbers.

Each image (JPEG or PNG; grayscale and RGBA are made RGB) goes through the eval preprocessing of
the dataset: ImageNet-style resize and centre crop, or, for the fixed-size CIFAR nets, a resize
to their 32x32. Prints the top-k classes with their probabilities, image by image.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import cli, datasets, models, paths, preprocessing, sources, weights
from resnet_jax.folder import read_image


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A network with the variables and the input pipeline to classify images."""

    model: Any
    variables: dict[str, Any]
    preprocess: preprocessing.Preprocess
    class_names: tuple[str, ...]

    def __call__(self, images: Sequence[np.ndarray], top_k: int = 5) -> list[list[tuple]]:
        """[(class name, probability), ...] of each uint8 RGB image, most likely first."""
        batch = np.stack([self._prepare(image) for image in images])  # uint8
        logits = _apply(self.model, self.preprocess.normalize, self.variables, batch)
        probabilities = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
        k = min(top_k, probabilities.shape[-1])
        best = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
        return [
            [(self.name(int(c)), float(p[c])) for c in row]
            for row, p in zip(best, probabilities, strict=True)
        ]

    def name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else f'class {index}'

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        shape = self.preprocess.info.image_shape
        if shape is not None and image.shape != tuple(shape):  # a fixed-size (CIFAR) net
            import cv2

            image = cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
        return self.preprocess({'image': image, 'label': 0})['image']


def _apply(model: Any, normalize: Any, variables: Any, images: np.ndarray) -> jax.Array:
    """Eval-mode logits of uint8 `images`, normalised on the device as in evaluation."""
    forward = lambda v, x: models.apply_model(model, v, normalize(x), train=False)[0]
    return jax.jit(forward)(variables, images)


def from_workdir(workdir: str, step: int | None = None, config: Any = None) -> Predictor:
    """The predictor of a run's checkpoint (the latest, or `step`)."""
    from resnet_jax import evaluate
    from resnet_jax import workdir as workdir_lib

    config = config or workdir_lib.read_config(workdir)
    model, state, _, info = evaluate.restore_state(config, workdir, step)
    ds = config.dataset
    preprocess = preprocessing.preprocess_of(ds, info, train=False)
    variables = jax.device_get(state.eval_variables())
    class_names = workdir_lib.read_class_names(workdir) or info.class_names  # as trained
    return Predictor(model, variables, preprocess, class_names)


def from_weights(
    path: str,
    model_name: str,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    normalization: str = 'imagenet',
) -> Predictor:
    """The predictor of a weights file: a PyTorch state dict or an `evaluate --export` file."""
    from resnet_jax import evaluate, pretrained

    if not paths.isfile(path):
        raise ValueError(f'weights {path!r} do not exist')
    family = models.family(model_name)  # ValueError for an unknown model
    if path.endswith('.msgpack'):
        variables = evaluate.load_exported(path)
        classes = int(np.shape(variables['params']['head']['bias'])[0])
        model = models.create_model(model_name, num_classes=classes)
    elif path.endswith(pretrained.TORCH_SUFFIXES):
        state = weights.load_state_dict(path)
        classes = pretrained.torch_head_classes(state)
        if classes is None:
            raise ValueError(f'weights {path!r} have no linear.weight or fc.weight head')
        model = models.create_model(model_name, num_classes=classes, **_torch_options(family))
        variables = pretrained.torch_converter(model)(state, model)
    else:
        raise ValueError(
            f'weights {path!r} are not a known kind; expected .msgpack (evaluate --export) or '
            f'{", ".join(pretrained.TORCH_SUFFIXES)}'
        )
    dataset = dataset or ('cifar10_jpeg' if family == 'cifar' else 'imagenet2012')
    info = _info_or_bare(dataset, data_dir, classes, family)
    if info.num_classes != classes:
        raise ValueError(
            f'weights {path!r} have {classes} classes, dataset {dataset!r} has '
            f'{info.num_classes}; pass the --dataset they were trained on'
        )
    preprocess = preprocessing.make_preprocess(
        info, train=False, data_dir=data_dir, normalization=normalization
    )
    return Predictor(model, variables, preprocess, info.class_names)


def _torch_options(family: str) -> dict[str, Any]:
    """How torchvision builds the ImageNet nets: stride in the 3x3 of a bottleneck (v1.5)."""
    return {} if family == 'cifar' else {'stride_on': '3x3'}


def _info_or_bare(
    name: str, data_dir: str | None, classes: int, family: str
) -> sources.DatasetInfo:
    """The dataset's info when it is prepared (class names, image size), else the bare spec."""
    if data_dir:
        try:
            return sources.dataset_info(name, data_dir)
        except ValueError:
            pass
    datasets.spec(name)  # ValueError for an unknown dataset
    shape = (32, 32, 3) if family == 'cifar' else None
    return sources.DatasetInfo(name, classes, shape, splits={})


def format_predictions(path: str, predictions: list[tuple[str, float]]) -> str:
    lines = [path] + [f'  {p:7.2%}  {name}' for name, p in predictions]
    return '\n'.join(lines)


def main(argv: list[str]) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    images = argv[1:]
    if not images:
        raise cli.UserError('no images given; expected IMAGE paths after the flags')
    for flag in ('workdir', 'weights'):  # '--workdir=' must not count as not given
        if FLAGS[flag].value is not None:
            paths.check_path_text(FLAGS[flag].value, f'--{flag}')
    if bool(FLAGS.workdir) == bool(FLAGS.weights):
        raise cli.UserError('pass exactly one of --workdir=DIR and --weights=FILE')
    if FLAGS.weights and not FLAGS.model:
        raise cli.UserError('--weights needs --model (e.g. --model=resnet20)')
    if FLAGS.top_k < 1:  # 0 would print each image's name and no class at all
        raise cli.UserError(f'--top_k={FLAGS.top_k}; expected a positive int (classes per image)')
    if FLAGS.step is not None and FLAGS.step < 0:
        raise cli.UserError(f'--step={FLAGS.step}; expected a checkpoint step >= 0 (or none)')
    # Flags of the other source would be ignored without a word: a run has its own network,
    # dataset and normalisation (recorded), a weights file one set of weights.
    other = ('model', 'dataset', 'normalization') if FLAGS.workdir else ('step',)
    given = [f'--{name}' for name in other if FLAGS[name].present]
    if given:
        source = '--workdir (the run recorded them)' if FLAGS.workdir else '--weights'
        raise cli.UserError(f'{", ".join(given)} cannot be used with {source}')
    pixels = [read_image(path) for path in images]  # every file checked before the model loads
    if FLAGS.workdir:
        predictor = from_workdir(FLAGS.workdir, FLAGS.step)
    else:
        predictor = from_weights(
            FLAGS.weights,
            FLAGS.model,
            dataset=FLAGS.dataset,
            data_dir=FLAGS.data_dir,
            normalization=FLAGS.normalization,
        )
    for path, predictions in zip(images, predictor(pixels, FLAGS.top_k), strict=True):
        print(format_predictions(path, predictions))


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string('workdir', None, 'A training workdir (its checkpoint and config).')
    flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
    flags.DEFINE_string('weights', None, 'A weights file: .msgpack, .pth, .th or .safetensors.')
    flags.DEFINE_string('model', None, 'With --weights: the network, e.g. resnet20.')
    flags.DEFINE_string('dataset', None, 'With --weights: its classes (default by model).')
    flags.DEFINE_string(
        'data_dir', os.path.join(paths.cache_dir(), 'tfds'), 'Where --dataset is prepared.'
    )
    flags.DEFINE_string('normalization', 'imagenet', 'With --weights: the input normalisation.')
    flags.DEFINE_integer('top_k', 5, 'How many classes to print per image.')


if __name__ == '__main__':
    _define_flags()
    cli.run(main, positional=True)
