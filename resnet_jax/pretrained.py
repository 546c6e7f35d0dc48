"""Starting a run from weights made elsewhere: `config.init_from=PATH`.

PATH is one of
- a PyTorch state dict (.pth, .pt, .th, .bin or .safetensors; the converter follows the model:
  `weights.from_torch_cifar` for CIFAR nets, `from_timm` for ResNet-D, `from_torchvision`
  otherwise);
- a Keras model file (.keras or .h5) of keras.applications.ResNet50/101/152 (`weights.from_keras`;
  needs keras, and the run's model.bn_epsilon=1.001e-5 that Keras's BatchNorm uses);
- a file written by `python -m resnet_jax evaluate --export=FILE.msgpack`;
- another run's workdir (its latest checkpoint; the moving average where that run kept one).

A head of another size is re-initialised, with a log line; every other variable must load, or
the run stops naming what is missing or mismatched. Only a fresh run reads PATH: a
resumed one continues from its own checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import flax
import numpy as np

from resnet_jax import evaluation, paths, serving, weights
from resnet_jax.models import ResNet

logger = logging.getLogger('resnet_jax')

Variables = dict[str, Any]
TORCH_SUFFIXES = ('.pth', '.pt', '.th', '.bin', '.safetensors')
KERAS_SUFFIXES = ('.keras', '.h5')
EXPORT_SUFFIX = '.msgpack'
KNOWN_SUFFIXES = (*TORCH_SUFFIXES, *KERAS_SUFFIXES, EXPORT_SUFFIX)


def check_path(path: str) -> None:
    """Raises ValueError unless `path` (local or gs://) is a weights file of a known kind or a
    run's workdir."""
    paths.check_supported(path, 'init_from')
    path = paths.normalize(path)
    if paths.isdir(path):
        if not paths.isdir(paths.join(path, 'checkpoints')):
            raise ValueError(
                f"init_from {path!r} is a directory without checkpoints/; expected a run's "
                'workdir or a weights file'
            )
        return
    if not paths.isfile(path):
        raise ValueError(
            f'init_from {path!r} does not exist; expected a weights file '
            f"({', '.join(KNOWN_SUFFIXES)}) or a run's workdir"
        )
    if not path.endswith(KNOWN_SUFFIXES):
        raise ValueError(
            f'init_from {path!r} is not a known weights file; expected one of '
            f"{', '.join(KNOWN_SUFFIXES)} or a run's workdir"
        )


def torch_converter(model: ResNet):
    if model.stem == 'cifar':
        return weights.from_torch_cifar
    if model.stem == 'deep':
        return weights.from_timm
    return weights.from_torchvision


def torch_head_classes(state: dict[str, np.ndarray]) -> int | None:
    for name in ('linear.weight', 'fc.weight'):
        if name in state:
            return int(np.shape(state[name])[0])
    return None


def _from_torch_file(path: str, model: ResNet) -> tuple[Variables, int | None]:
    state = weights.load_state_dict(path)
    classes = torch_head_classes(state)
    source_model = (
        model if classes in (None, model.num_classes) else model.clone(num_classes=classes)
    )
    return torch_converter(model)(state, source_model), classes


def _from_keras_file(path: str, model: ResNet) -> tuple[Variables, int | None]:
    try:
        import keras
    except ImportError as e:
        raise ValueError(f'init_from {path!r} is a Keras file: reading it needs keras') from e
    try:
        keras_model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # keras raises ValueError, OSError, TypeError, ... for a bad file
        raise ValueError(f'init_from {path!r}: cannot read it as a Keras model: {e}') from e
    head = [layer for layer in keras_model.layers if layer.name == 'predictions']
    classes = int(head[0].get_weights()[1].shape[0]) if head and head[0].weights else None
    source_model = (
        model if classes in (None, model.num_classes) else model.clone(num_classes=classes)
    )
    try:
        return weights.from_keras(keras_model, source_model), classes
    except ValueError as e:  # what does not fit, or a NaN weight: named with the file
        raise ValueError(f'init_from {path!r}: {e}') from e


def _from_export(path: str) -> tuple[Variables, int | None]:
    variables = serving.load_exported(path, what='init_from')
    return variables, int(np.shape(variables['params']['head']['bias'])[0])


def _from_workdir(path: str) -> tuple[Variables, int]:
    """What the run in `path` evaluates with, from its workdir alone (no dataset, optimizer or
    trainer of that run is needed: resnet_jax.evaluation)."""
    run = evaluation.read_run(path)
    logger.info('init_from: %s at step %d', path, run.step)
    return evaluation.variables_on_host(run), run.input.num_classes


def load_variables(path: str, model: ResNet, fresh: Variables) -> Variables:
    """`model`'s variables from `path`, the head taken from `fresh` where the class count differs.

    Args:
      fresh: the new run's own initial variables (for a re-initialised head).
    Raises:
      ValueError: naming what does not fit.
    """
    check_path(path)
    path = paths.normalize(path)
    if paths.isdir(path):
        loaded, classes = _from_workdir(path)
    elif path.endswith(EXPORT_SUFFIX):
        loaded, classes = _from_export(path)
    else:
        # torch and Keras read local files only: a file on a bucket is read through a copy.
        with paths.local_copy(path) as local:
            read = _from_keras_file if path.endswith(KERAS_SUFFIXES) else _from_torch_file
            try:
                loaded, classes = read(local, model)
            except ValueError as e:  # named as the user gave it, not as the copy
                raise ValueError(str(e).replace(local, path)) from None
    loaded = {k: dict(v) for k, v in loaded.items()}
    if classes is not None and classes != model.num_classes:
        logger.warning(
            'init_from: %s has a head of %d classes, this run %d: the head is re-initialised',
            path,
            classes,
            model.num_classes,
        )
        loaded['params']['head'] = fresh['params']['head']
    expected, got = _shapes(fresh), _shapes(loaded)
    if expected != got:
        differ = sorted(set(expected.items()) ^ set(got.items()))[:6]
        raise ValueError(
            f'init_from {path!r} does not fit this model ({model.stem} stem, '
            f'scan_blocks={model.scan_blocks}): {len(differ)}+ variables differ, e.g. '
            + ', '.join(f'{k} {v}' for k, v in differ)
        )
    dtypes = {k: np.asarray(v).dtype for k, v in _leaves(fresh).items()}
    out: Variables = {}
    for key, value in _leaves(loaded).items():
        node = out
        *parents, leaf = key
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value, dtypes[key])
    return out


def _leaves(tree: Any) -> dict[tuple[str, ...], Any]:
    return flax.traverse_util.flatten_dict(tree)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {'/'.join(k): tuple(np.shape(v)) for k, v in _leaves(tree).items()}
