"""Weights in and out of other frameworks, and between the unrolled and scanned layouts.

* `from_torchvision(state_dict, model)`: torchvision's resnet18..152 (ResNet v1.5, stride on the
  3x3 of a bottleneck) into a model built with `stride_on='3x3'`, `shortcut='B'`.
* `from_timm(state_dict, model)`: timm's resnet18..152 and ResNet-D (resnet50d, resnet101d: deep
  stem, average-pool shortcuts) into the model of the same name.
* `from_keras(keras_model, model)`: `keras.applications` ResNet50/101/152 (v1, stride on the first
  1x1) into a model built with `stride_on='1x1'`, `shortcut='B'`, `bn_epsilon=1.001e-5`.
* `load_state_dict(path)`: a torchvision checkpoint file, read without executing pickled code.
* `check_finite(tensors, source)`: the one check every loader runs on what it reads (here, and
  `serving.load_exported`, `pretrained.load_variables`): no NaN or Inf enters a network.
* `to_scanned` / `to_unrolled`: the same weights for `scan_blocks=True` / `False`.

Conversions read the target model's variable shapes with `jax.eval_shape` (no weights are
initialised), map every variable to exactly one source tensor, and raise one ValueError that
names every missing, unexpected or mis-shaped entry. Nothing here imports torch or keras at
module level: both are optional, and only the objects the caller passes in are touched.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import options
from resnet_jax.layers import Bottleneck
from resnet_jax.models import ResNet, Variables, init_variables

TORCHVISION_BN_EPSILON = 1e-5
KERAS_BN_EPSILON = 1.001e-5

# Where one of our variables comes from: (the source's name for it, a function returning it).
# (the source's name for a variable, a function fetching its value as stored there, and the
# axis permutation from the source's layout to ours, None if they agree).
_Source = tuple[str, Callable[[], Any], tuple[int, ...] | None]
_OIHW_TO_HWIO = (2, 3, 1, 0)
_TRANSPOSED = (1, 0)

_BN_SUFFIX = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


# --- Unrolled <-> scanned --------------------------------------------------------------------


def _block_index(key: str) -> int | None:
    match = re.fullmatch(r'block(\d+)', key)
    return int(match.group(1)) if match else None


def to_scanned(variables: Variables) -> Variables:
    """Stacks blocks 2..n of every stage under `repeated/block`, the layout of `scan_blocks`."""

    def stage(tree: Mapping[str, Any]) -> dict[str, Any]:
        rest = sorted((i, k) for k in tree if (i := _block_index(k)) is not None and i > 1)
        out = {k: v for k, v in tree.items() if not (_block_index(k) or 0) > 1}
        if rest:
            blocks = [tree[k] for _, k in rest]
            out['repeated'] = {'block': jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
        return out

    return _map_stages(variables, stage)


def to_unrolled(variables: Variables) -> Variables:
    """Splits the stacked `repeated/block` of every stage back into `block2`, `block3`, ..."""

    def stage(tree: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in tree.items() if k != 'repeated'}
        if 'repeated' in tree:
            stacked = tree['repeated']['block']
            length = jax.tree.leaves(stacked)[0].shape[0]
            for i in range(length):
                out[f'block{i + 2}'] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
        return out

    return _map_stages(variables, stage)


def _map_stages(variables: Variables, fn: Callable) -> Variables:
    return {
        collection: {k: fn(v) if re.fullmatch(r'stage\d+', k) else v for k, v in tree.items()}
        for collection, tree in variables.items()
    }


# --- Shared machinery ------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _unrolled_shapes(model: ResNet) -> Variables:
    unrolled = model.clone(scan_blocks=False, dtype=np.float32)
    return jax.eval_shape(lambda: init_variables(unrolled, jax.random.key(0), (64, 64, 3)))


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, 'detach'):  # A torch tensor; torch itself need not be imported here.
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _convert(
    model: ResNet,
    source_of: Callable[[tuple[str, ...]], _Source],
    available: set[str],
    what: str,
) -> tuple[Variables, set[str]]:
    """Fills every variable of `model` from its source; returns them and the names used.

    Raises one ValueError listing every missing name and every shape mismatch.
    """
    variables: Variables = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for path, leaf in _flatten(_unrolled_shapes(model)):
        name, fetch, layout = source_of(path)
        if name not in available:
            missing.append(name)
            continue
        used.add(name)
        given = _to_numpy(fetch())
        expected = leaf.shape
        if layout is not None:  # shapes are named in the source's layout, as the user has them
            expected = tuple(leaf.shape[layout.index(axis)] for axis in range(len(layout)))
        if given.shape != expected:
            mismatched.append(
                f'{name} has shape {given.shape}, expected {expected} (for {"/".join(path)})'
            )
            continue
        value = given.transpose(layout) if layout is not None else given
        _set(variables, path, value)
    problems = []
    if missing:
        problems.append(f'missing {len(set(missing))}: {_some(_natural_sort(set(missing)))}')
    if mismatched:
        problems.append(f'shape mismatches: {_some(mismatched, "; ")}')
    if problems:
        raise ValueError(f'{what} does not fit the model: ' + ' | '.join(problems))
    if model.scan_blocks:
        variables = to_scanned(variables)
    return variables, used


def _natural_sort(names: set[str]) -> list[str]:
    """block2 before block10."""
    return sorted(
        names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', n)]
    )


def _some(names: list[str], sep: str = ', ', limit: int = 12) -> str:
    """The first `limit` names, and how many more: enough to see the pattern."""
    more = f'{sep}... and {len(names) - limit} more' if len(names) > limit else ''
    return sep.join(names[:limit]) + more


_require = options.require


def _nonfinite_count(value: Any) -> int:
    if isinstance(value, jax.Array):  # counted on its devices: a sharded array is not gathered
        if not jnp.issubdtype(value.dtype, jnp.inexact):
            return 0
        return int(jnp.sum(~jnp.isfinite(value)))
    if hasattr(value, 'detach'):  # a torch tensor (bfloat16 has no numpy twin: made float32)
        value = _to_numpy(value)
    try:
        finite = np.isfinite(np.asarray(value))
    except TypeError:  # not numbers (a string in a msgpack file): nothing to be non-finite
        return 0
    return int(finite.size - np.count_nonzero(finite))


def check_finite(tensors: Mapping[str, Any], source: str) -> None:
    """Raises one ValueError naming the first tensor of `tensors` that holds a NaN or an Inf.

    Called by every loader where weights enter (files, state dicts, Keras models, exports,
    another run's checkpoint): a network with a NaN weight still answers with confidence, as
    XLA's ReLU on CPU turns NaN into 0 and the logits stay finite.

    Args:
      tensors: names to arrays (torch tensors, numpy or jax arrays); nested mappings are
        walked and their names joined by '/', so each is named as its source names it
        ('layer1.0.conv1.weight', 'params/stem_conv/kernel').
      source: what they were read from, e.g. "weights '/x/model.pth'".
    """
    bad = []
    for path, value in _flatten(tensors):
        count = _nonfinite_count(value)
        if count:
            bad.append(('/'.join(map(str, path)), count))
    if not bad:
        return
    (name, count), others = bad[0], [n for n, _ in bad[1:]]
    also = f' (and {len(others)} other tensors: {_some(others, limit=3)})' if others else ''
    raise ValueError(
        f'{source}: tensor {name!r} has {count} non-finite value{"s" if count > 1 else ""} '
        f'(NaN/Inf){also}; expected finite weights'
    )


def _check_imagenet_model(model: Any, source: str) -> None:
    stem = getattr(model, 'stem', None)
    _require(
        isinstance(model, ResNet) and stem == 'imagenet',
        f'{source} weights need an ImageNet ResNet from create_model (resnet18..resnet152), '
        f'got {type(model).__name__}'
        + (f' with the {stem!r} stem' if isinstance(model, ResNet) else ''),
    )
    _require(
        model.shortcut == 'B',
        f'{source} ResNets project only where the shape changes: build the model with '
        f"shortcut='B', got shortcut={model.shortcut!r}",
    )


# --- PyTorch layouts: torchvision and timm -------------------------------------------------

# timm's deep stem (resnet50d): Sequential(conv, bn, relu, conv, bn, relu, conv), then bn1.
_TIMM_DEEP_STEM = {
    'stem_conv1': 'conv1.0',
    'stem_bn1': 'conv1.1',
    'stem_conv2': 'conv1.3',
    'stem_bn2': 'conv1.4',
    'stem_conv3': 'conv1.6',
    'stem_bn3': 'bn1',
}
_TORCHVISION_STEM = {'stem_conv': 'conv1', 'stem_bn': 'bn1'}


def _torch_name(
    path: tuple[str, ...],
    stem: Mapping[str, str],
    downsample: int,
    projection: str = 'downsample',
    head: str = 'fc',
) -> tuple[str, bool]:
    """The PyTorch name of one of our variables, and whether it is a conv kernel.

    Args:
      stem: our stem modules -> theirs.
      downsample: the index of the projection conv in `downsample` (0 in torchvision; 1 in
        timm's average-pool shortcuts, where index 0 is the pool).
      projection: the name of a block's projection Sequential ('shortcut' in CIFAR code).
      head: the name of the classifier ('linear' in CIFAR code).
    """
    _, *module, leaf = path
    if module == ['head']:
        return (f'{head}.weight' if leaf == 'kernel' else f'{head}.bias'), False
    if module[0] in stem:
        torch_module = stem[module[0]]
    else:
        stage, block, *rest = module
        prefix = f'layer{stage[len("stage") :]}.{int(block[len("block") :]) - 1}'
        ours = {
            'proj_conv': f'{projection}.{downsample}',
            'proj_bn': f'{projection}.{downsample + 1}',
        }
        torch_module = f'{prefix}.{ours.get(rest[-1], rest[-1])}'
    if leaf == 'kernel':
        return f'{torch_module}.weight', True
    return f'{torch_module}.{_BN_SUFFIX[leaf]}', False


def _from_torch(
    state_dict: Mapping[str, Any],
    model: ResNet,
    name_of: Callable[[tuple[str, ...]], tuple[str, bool]],
    what: str,
    head: str = 'fc.weight',
) -> Variables:
    """Fills `model` from a PyTorch state dict named by `name_of`; every entry must be used."""
    _require(
        isinstance(state_dict, Mapping),
        f'state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}',
    )

    def source(path: tuple[str, ...]) -> _Source:
        name, is_conv = name_of(path)
        layout = _OIHW_TO_HWIO if is_conv else _TRANSPOSED if name == head else None
        return name, lambda: state_dict[name], layout

    # num_batches_tracked only drives PyTorch's momentum=None averaging; it has no counterpart.
    names = {k for k in state_dict if not k.endswith('num_batches_tracked')}
    check_finite({k: state_dict[k] for k in _natural_sort(names)}, what)
    variables, used = _convert(model, source, names, what)
    unexpected = _natural_sort(names - used)
    _require(
        not unexpected,
        f'{what} has {len(unexpected)} unexpected entries for this model: {_some(unexpected)}',
    )
    return variables


def _check_torch_bottlenecks(model: ResNet, source: str) -> None:
    if issubclass(model.block_cls, Bottleneck):
        _require(
            model.stride_on == '3x3',
            f"{source}'s bottleneck ResNets stride on the 3x3 convolution (v1.5): build the "
            f"model with stride_on='3x3', got stride_on={model.stride_on!r}",
        )
    _require(
        model.bn_epsilon == TORCHVISION_BN_EPSILON,
        f'{source} BatchNorm uses epsilon={TORCHVISION_BN_EPSILON}: build the model with '
        f'bn_epsilon={TORCHVISION_BN_EPSILON}, got {model.bn_epsilon}',
    )


def from_torchvision(state_dict: Mapping[str, Any], model: ResNet) -> Variables:
    """Converts a torchvision ResNet state dict into variables for `model`.

    Args:
      state_dict: torchvision's `model.state_dict()`, or the mapping `load_state_dict` returns:
        names to torch tensors or numpy arrays.
      model: `create_model('resnetN', num_classes=..., stride_on='3x3')` (shortcut 'B' is the
        ImageNet default); torchvision's BatchNorm epsilon, 1e-5, is the default too.
        `scan_blocks` models are supported.

    Returns:
      {'params': ..., 'batch_stats': ...} as float32 numpy arrays.

    Raises:
      ValueError: the model is not a matching ImageNet ResNet, the state dict has missing,
        unexpected or mis-shaped entries (all of them named in the message), or a tensor
        holds a NaN or Inf.
    """
    _check_imagenet_model(model, 'torchvision')
    _check_torch_bottlenecks(model, 'torchvision')
    name_of = functools.partial(_torch_name, stem=_TORCHVISION_STEM, downsample=0)
    return _from_torch(state_dict, model, name_of, 'torchvision state_dict')


def from_timm(state_dict: Mapping[str, Any], model: ResNet) -> Variables:
    """Converts a timm ResNet state dict: resnet18..152 (torchvision's layout) and ResNet-D
    (resnet50d, resnet101d: the deep stem and average-pool shortcuts).

    Args:
      state_dict: `timm.create_model(name).state_dict()`, or what `load_state_dict` returns.
      model: `create_model('resnet50d', num_classes=...)` (its defaults are timm's), or an
        ImageNet ResNet built as for `from_torchvision`.

    Raises:
      ValueError: as `from_torchvision`.
    """
    _require(
        isinstance(model, ResNet) and model.stem in ('imagenet', 'deep'),
        f'timm weights need an ImageNet ResNet from create_model, got {type(model).__name__}'
        + (f' with the {model.stem!r} stem' if isinstance(model, ResNet) else ''),
    )
    if model.stem == 'deep':
        _require(
            model.shortcut == 'D',
            "timm's ResNet-D shortcuts average-pool then project: build the model with "
            f"shortcut='D', got shortcut={model.shortcut!r}",
        )
    else:
        _check_imagenet_model(model, 'timm')
    _check_torch_bottlenecks(model, 'timm')
    deep = model.stem == 'deep'
    name_of = functools.partial(
        _torch_name,
        stem=_TIMM_DEEP_STEM if deep else _TORCHVISION_STEM,
        downsample=1 if model.shortcut == 'D' else 0,
    )
    return _from_torch(state_dict, model, name_of, 'timm state_dict')


def from_torch_cifar(state_dict: Mapping[str, Any], model: ResNet) -> Variables:
    """Converts a PyTorch CIFAR ResNet (the layout of akamaster/pytorch_resnet_cifar10 and most
    CIFAR code) into variables for one of our CIFAR nets.

    Their names: `conv1`, `bn1`, `layerS.B.conv1|bn1|conv2|bn2` (S = 1..3, B from 0), the
    projection of option B/C blocks `layerS.B.shortcut.0|1`, and `linear`. Option A shortcuts
    have no parameters, as ours; both zero-pad the new channels evenly on each side.

    Args:
      state_dict: names to tensors or arrays (`load_state_dict` reads .safetensors, .th, .pth).
      model: `create_model('resnetN', num_classes=...)` with the shortcut option the weights
        were trained with (A for the paper's CIFAR nets, the default).

    Raises:
      ValueError: a model that is not a CIFAR ResNet, or missing, unexpected or mis-shaped
        entries (all of them named in the message).
    """
    _require(
        isinstance(model, ResNet) and model.stem == 'cifar',
        'PyTorch CIFAR weights need a CIFAR ResNet from create_model (resnet20, resnet32, ...), '
        f'got {type(model).__name__}'
        + (f' with the {model.stem!r} stem' if isinstance(model, ResNet) else ''),
    )
    _require(
        model.bn_epsilon == TORCHVISION_BN_EPSILON,
        f'PyTorch BatchNorm uses epsilon={TORCHVISION_BN_EPSILON}: build the model with '
        f'bn_epsilon={TORCHVISION_BN_EPSILON}, got {model.bn_epsilon}',
    )
    name_of = functools.partial(
        _torch_name, stem=_TORCHVISION_STEM, downsample=0, projection='shortcut', head='linear'
    )
    return _from_torch(state_dict, model, name_of, 'PyTorch CIFAR state_dict', head='linear.weight')


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint without executing pickled code.

    `.safetensors` files are read with safetensors (torch not needed); `.pt`/`.pth`/`.th`/
    `.bin` with `torch.load(..., weights_only=True)`, which refuses anything but tensors and
    containers. A checkpoint that wraps the weights as {'state_dict': ..., other entries} or
    {'model': ...} is unwrapped, and DataParallel's `module.` prefix is removed.

    Raises:
      ValueError: one line naming the file: missing, empty, of an unknown kind, unreadable as
        its kind (damaged, cut off, not a checkpoint), or holding a NaN or Inf (`check_finite`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f'weights file {path!r} does not exist or is not a file')
    if not path.endswith(('.safetensors', '.pt', '.pth', '.th', '.bin')):
        raise ValueError(
            f'weights file {path!r} has an unknown extension; expected .safetensors, .pt, .pth, '
            '.th or .bin'
        )
    if os.path.getsize(path) == 0:
        raise ValueError(f'weights file {path!r} is empty; expected a saved state dict')
    state = _read_safetensors(path) if path.endswith('.safetensors') else _read_torch(path)
    check_finite(state, f'weights {path!r}')
    return state


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except Exception as e:  # SafetensorError (not a ValueError) for a damaged or cut-off file
        raise ValueError(
            f'cannot read {path!r} as safetensors ({type(e).__name__}: {e}); expected a file '
            "written by safetensors' save_file"
        ) from e


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f'reading {path!r} needs torch (pip install torch), or convert it to .safetensors'
        ) from e
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(
            f'cannot read {path!r} as a weights-only torch checkpoint ({_torch_load_reason(e)}); '
            'expected a state dict saved by torch.save (tensors and containers only)'
        ) from e
    for wrapper in ('state_dict', 'model'):  # beside e.g. 'best_prec1', 'epoch'
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f'{path!r} holds a {type(state).__name__}, expected a state dict')
    if state and all(k.startswith('module.') for k in state):  # saved from DataParallel
        state = {k[len('module.') :]: v for k, v in state.items()}
    return {k: _to_numpy(v) for k, v in state.items()}


def _torch_load_reason(error: Exception) -> str:
    """The part of torch.load's error that says what is wrong with the file.

    Its weights-only refusal is a paragraph that advises `weights_only=False` (running the
    file's code): for a damaged file or one holding code, only the unpickler's reason counts.
    """
    message = ' '.join(str(error).split())
    if isinstance(error, EOFError):
        return 'it ends early: cut off?'
    if 'WeightsUnpickler error:' in message:
        reason = message.split('WeightsUnpickler error:', 1)[1].split(' Check the documentation')[0]
        return f'not tensors and containers: {reason.strip()}'
    return f'{type(error).__name__}: {message.split(". ")[0]}'


# --- Keras -----------------------------------------------------------------------------------

# Our module name -> (Keras layer suffix inside a block).
_KERAS_BLOCK_LAYER = {
    'conv1': '1_conv',
    'bn1': '1_bn',
    'conv2': '2_conv',
    'bn2': '2_bn',
    'conv3': '3_conv',
    'bn3': '3_bn',
    'proj_conv': '0_conv',
    'proj_bn': '0_bn',
}
_KERAS_BN_INDEX = {'scale': 0, 'bias': 1, 'mean': 2, 'var': 3}


def _keras_layer(module: list[str]) -> str:
    if module[0] in ('stem_conv', 'stem_bn', 'head'):
        return {'stem_conv': 'conv1_conv', 'stem_bn': 'conv1_bn', 'head': 'predictions'}[module[0]]
    stage, block, *rest = module
    return f'conv{int(stage[len("stage") :]) + 1}_{block}_{_KERAS_BLOCK_LAYER[rest[-1]]}'


def from_keras(keras_model: Any, model: ResNet) -> Variables:
    """Converts a `keras.applications` ResNet50/101/152 (v1) into variables for `model`.

    Keras's convolutions carry biases; each is folded exactly into the running mean of the
    BatchNorm that follows it (BN(conv(x) + b) == BN'(conv(x)) with mean' = mean - b).
    Build the Keras model with `include_top=True` and, to compare logits,
    `classifier_activation=None`.

    Args:
      keras_model: a built `keras.applications.ResNet50/101/152` (any backend).
      model: `create_model('resnetN', num_classes=..., bn_epsilon=1.001e-5)` with the
        defaults stride_on='1x1' and shortcut='B'. `scan_blocks` models are supported.

    Returns:
      {'params': ..., 'batch_stats': ...} as float32 numpy arrays.

    Raises:
      ValueError: the model does not match Keras's architecture, layers are missing,
        unexpected or mis-shaped (all of them named in the message), or a weight holds a NaN
        or Inf.
    """
    _check_imagenet_model(model, 'Keras')
    _require(
        issubclass(model.block_cls, Bottleneck) and model.stride_on == '1x1',
        'keras.applications ResNets are bottleneck nets (resnet50/101/152) with the stride on '
        f"the first 1x1 (stride_on='1x1'); got {model.block_cls.__name__} blocks with "
        f'stride_on={model.stride_on!r}',
    )
    layers = {layer.name: layer for layer in getattr(keras_model, 'layers', ()) if layer.weights}
    _require(bool(layers), f'expected a built Keras model, got {type(keras_model).__name__}')
    _require(
        not any('preact' in name for name in layers),
        'this is a pre-activation ResNetV2, a different architecture from the paper; expected '
        'keras.applications.ResNet50/101/152',
    )
    epsilons = {
        float(layer.epsilon)
        for layer in layers.values()
        if type(layer).__name__.endswith('BatchNormalization')
    }
    _require(
        epsilons <= {model.bn_epsilon},
        f'Keras BatchNorm uses epsilon={sorted(epsilons)}: build the model with '
        f'bn_epsilon={min(epsilons, default=KERAS_BN_EPSILON)}, got {model.bn_epsilon}',
    )
    weights = {name: layer.get_weights() for name, layer in layers.items()}
    check_finite(
        {
            f'{name}/{variable.name}': value
            for name, layer in layers.items()
            for variable, value in zip(layer.weights, weights[name], strict=True)
        },
        'Keras model',
    )

    def source(path: tuple[str, ...]) -> _Source:
        _, *module, leaf = path
        layer = _keras_layer(module)
        if not layer.endswith('_bn'):  # A conv kernel, or the head's kernel and bias.
            return layer, lambda: weights[layer][leaf == 'bias'], None
        if leaf != 'mean':
            return layer, lambda: weights[layer][_KERAS_BN_INDEX[leaf]], None
        conv = weights.get(layer.removesuffix('bn') + 'conv', [])
        conv_bias = conv[1] if len(conv) > 1 else 0.0
        return layer, lambda: weights[layer][_KERAS_BN_INDEX['mean']] - conv_bias, None

    variables, used = _convert(model, source, set(weights), 'Keras model')
    unexpected = _natural_sort(set(weights) - used)
    _require(
        not unexpected,
        f'Keras model has {len(unexpected)} unexpected layers for this model: {_some(unexpected)}',
    )
    return variables
