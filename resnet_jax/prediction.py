"""The most likely classes of images, from a run or from a weights file (`Predictor`).

A run's predictor prepares images as the run's own evaluation did (its eval crop and its input
normalisation, recorded in the checkpoint: no dataset is needed) and names classes as the run
was trained; a weights file's takes the dataset's names where it is prepared, else numbers.
Each image (uint8 RGB) goes through the eval preprocessing: ImageNet-style resize and centre
crop, or for the fixed-size CIFAR nets a resize to their 32x32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import (
    datasets,
    evaluation,
    models,
    paths,
    preprocessing,
    pretrained,
    serving,
    sources,
    weights,
)


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


def from_run(run: evaluation.Run) -> Predictor:
    """The predictor of a run's checkpoint (`evaluation.read_run`): the variables it evaluates
    with, its eval preprocessing and normalisation, its class names; no dataset needed."""
    return Predictor(run.model, run.variables, run.input.eval_preprocess(), run.class_names())


def from_workdir(workdir: str, step: int | None = None, config: Any = None) -> Predictor:
    """The predictor of the run in `workdir` (its newest checkpoint, or `step`)."""
    return from_run(evaluation.read_run(workdir, step=step, config=config))


def from_weights(
    path: str,
    model_name: str,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    normalization: str = 'imagenet',
) -> Predictor:
    """The predictor of a weights file: a PyTorch state dict or an `evaluate --export` file."""
    if not paths.isfile(path):
        raise ValueError(f'weights {path!r} do not exist')
    family = models.family(model_name)  # ValueError for an unknown model
    if path.endswith('.msgpack'):
        variables = serving.load_exported(path)
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
