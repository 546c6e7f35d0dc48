"""Exports a trained network for serving: one file that takes uint8 images and returns logits.

    python -m resnet_jax evaluate --workdir=DIR --export=model.stablehlo   # jax.export
    python -m resnet_jax evaluate --workdir=DIR --export=model.onnx        # ONNX (jax2onnx)
    python -m resnet_jax evaluate --workdir=DIR --export=weights.msgpack   # the variables only

The format follows from the suffix (`export_format`); another suffix, or none, is refused: a
file named `model.pt` or `model` that holds msgpack would mislead whoever loads it. The two
serving formats hold the whole
inference function: the input normalisation of the run (`(x - mean) / std`, per channel or the
per-pixel mean image) and the network in eval mode, its weights as constants. Their input is a
batch of uint8 NHWC images of the size the network was evaluated at (CIFAR 32x32, ImageNet
224x224: resize and crop happen before, as `predict` does them), any batch size; the output is
float32 logits (batch, classes). So a server needs neither this package nor Flax, and cannot
feed the network differently normalised images than it was trained on.

- `.stablehlo`: a serialised `jax.export.Exported`, lowered for CPU, CUDA and TPU; loaded with
  `jax.export.deserialize(bytearray(data)).call(images)` (or served by anything that reads
  StableHLO). Only jax is needed to run it.
- `.onnx`: an ONNX graph for onnxruntime and other ONNX runtimes; needs the `export` extra
  (`pip install 'resnet_jax[export]'`: jax2onnx, onnx) to write, not to run.
- `.msgpack`: the Flax msgpack of the variables (`load_exported`).

Weights, normalisation and image size are arguments of `export`; `export_run` takes them from a
run's checkpoint (the moving average where the run kept one, and the input it recorded).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import augment, models, paths, weights

FORMATS = {'.stablehlo': 'stablehlo', '.onnx': 'onnx', '.msgpack': 'msgpack'}
# Lowered for all three: an artifact exported on a CPU host serves on GPUs and TPUs.
PLATFORMS = ('cpu', 'cuda', 'tpu')
# ONNX opset 21 (ONNX 1.16), not jax2onnx's default (23): older runtimes read it, and the file
# does not change with the converter's release.
ONNX_OPSET = 21
INPUT_NAME, OUTPUT_NAME = 'images', 'logits'
EXPORT_EXTRA = "pip install 'resnet_jax[export]'"


def export_format(path: str) -> str:
    """'stablehlo', 'onnx' or 'msgpack', from the suffix of `path`.

    Raises:
      ValueError: for another suffix or none (once, every other one silently meant msgpack).
    """
    suffix = os.path.splitext(str(path).rstrip('/'))[1]
    if suffix.lower() not in FORMATS:
        given = f'suffix {suffix!r}' if suffix else 'no suffix'
        raise ValueError(
            f'export {str(path)!r} has {given}; expected {", ".join(FORMATS)} (the format follows '
            'from it)'
        )
    return FORMATS[suffix.lower()]


def check_destination(path: str) -> str:
    """The format of `path`, once it is known that it can be written: called before a long
    evaluation, so a typo in the name or the folder, a read-only place or a missing package
    stops the command at once, with nothing written.

    Raises:
      ValueError: a suffix of no format, a URL scheme `paths` does not support; locally, a
        folder that does not exist or is not writable, a target that is a directory or a
        read-only file; ONNX without jax2onnx / onnx installed.
    """
    paths.check_path_text(path, 'export')
    paths.check_supported(path, 'export')
    if not paths.is_url(path):
        _check_local_destination(path)
    fmt = export_format(path)
    if fmt == 'onnx':
        for package in ('jax2onnx', 'onnx'):
            if _find_spec(package) is None:
                raise _missing(package)
    return fmt


def _check_local_destination(path: str) -> None:
    target = paths.normalize(path)
    if os.path.isdir(target):
        raise ValueError(
            f'export {path!r} is a directory; expected a file name in it, e.g. '
            f'{os.path.join(path, "model.stablehlo")!r}'
        )
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise ValueError(f'export {path!r}: folder {folder!r} does not exist')
    # The write goes to a temporary file beside the target, then renamed over it: the folder
    # must be writable; and a read-only file there is one somebody meant to keep.
    if not os.access(folder, os.W_OK):
        raise ValueError(f'export {path!r}: folder {folder!r} is not writable')
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise ValueError(f'export {path!r} exists and is read-only; expected a writable target')


def serving_function(
    model: Any, variables: Any, mean: Any, std: Any = None
) -> Callable[[jax.Array], jax.Array]:
    """fn(uint8 images (batch, H, W, C)) -> float32 logits: normalisation, then the network in
    eval mode, with `variables` ({'params', 'batch_stats'}) closed over (constants once traced).

    `(x - mean) / std` in float32 is `augment.normalize`, what evaluation feeds the network.
    `mean` is per channel (C,) or per pixel (H, W, C); `std` None is mean subtraction only.
    """
    variables = jax.device_get(
        {'params': variables['params'], 'batch_stats': variables['batch_stats']}
    )
    mean = np.asarray(mean, np.float32)
    std = None if std is None else np.asarray(std, np.float32)

    def serve(images: jax.Array) -> jax.Array:
        x = augment.normalize(images, mean, std)  # traced: the same arithmetic on the device
        logits, _ = models.apply_model(model, variables, x, train=False)
        return logits.astype(jnp.float32)

    return serve


def stablehlo_bytes(
    model: Any, variables: Any, *, mean: Any, std: Any, image_shape: Sequence[int]
) -> bytes:
    """The serialised `jax.export` of `serving_function`, batch size symbolic ('batch').

    Height and width stay fixed: the network's pooling and the per-pixel mean are for one size.
    """
    fn = serving_function(model, variables, mean, std)
    shape = jax.export.symbolic_shape(f'batch, {", ".join(map(str, _checked(image_shape, mean)))}')
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(
        jax.ShapeDtypeStruct(shape, jnp.uint8)
    )
    return bytes(exported.serialize())


def onnx_bytes(
    model: Any, variables: Any, *, mean: Any, std: Any, image_shape: Sequence[int]
) -> bytes:
    """The ONNX model of `serving_function` (input 'images' (B, H, W, C) uint8, output
    'logits'), converted by jax2onnx.

    The network computes in float32 whatever its `dtype`: onnxruntime has no bfloat16
    convolutions on CPU, and the parameters are float32 already (StableHLO keeps the dtype).
    Two workarounds for jax2onnx: it cannot convert `nn.scan`, so a `scan_blocks` model is
    exported as its unrolled twin (the same numbers, `weights.to_unrolled`); and the shapes it
    records for intermediate values (`value_info`) are partly wrong (NHWC shapes on NCHW
    tensors), so they are dropped: they are optional hints, which runtimes infer themselves.

    Raises:
      ValueError: jax2onnx or onnx is not installed.
    """
    to_onnx = _import_onnx_exporter()
    if getattr(model, 'scan_blocks', False):
        model, variables = model.clone(scan_blocks=False), weights.to_unrolled(variables)
    if getattr(model, 'dtype', jnp.float32) != jnp.float32:
        model = model.clone(dtype=jnp.float32)
    fn = serving_function(model, variables, mean, std)
    spec = jax.ShapeDtypeStruct(('B', *_checked(image_shape, mean)), jnp.uint8)
    with _quiet_jax2onnx():
        proto = to_onnx(
            fn,
            inputs=[spec],
            model_name='resnet_jax',
            opset=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
    del proto.graph.value_info[:]
    return proto.SerializeToString()


def export(
    path: str,
    model: Any,
    variables: Any,
    *,
    mean: Any,
    std: Any,
    image_shape: Sequence[int],
) -> str:
    """Writes `variables` to `path` in the format its suffix names; returns the format.

    StableHLO and ONNX hold `serving_function` (the model, normalisation by `mean` / `std`,
    uint8 images of `image_shape` = (H, W, C)); msgpack holds `variables` alone. Written whole
    through `paths` (local or gs://).
    """
    fmt = check_destination(path)
    if fmt == 'msgpack':
        write_variables(path, variables)
        return fmt
    write = stablehlo_bytes if fmt == 'stablehlo' else onnx_bytes
    paths.write_bytes(path, write(model, variables, mean=mean, std=std, image_shape=image_shape))
    return fmt


def write_variables(path: str, variables: Any) -> None:
    """The Flax msgpack of `variables` (what `load_exported` reads), written whole."""
    import flax.serialization

    paths.write_bytes(path, flax.serialization.msgpack_serialize(jax.device_get(variables)))


def load_exported(path: str, what: str = 'weights') -> dict[str, Any]:
    """{'params', 'batch_stats'} written by `export`, for `resnet_jax.apply_model`.

    Raises:
      ValueError: naming `what` (the flag or field it was given as) and the file, if it is not
        a file `export` writes (damaged, cut off, of another kind) or holds a NaN or Inf.
    """
    import flax.serialization

    with paths.open_file(path, 'rb') as f:
        blob = f.read()
    expected = 'expected a file written by evaluate --export=FILE.msgpack'
    try:
        variables = flax.serialization.msgpack_restore(blob)
    except Exception as e:  # msgpack's errors for a file of another kind: ValueError and kin
        raise ValueError(
            f'{what} {path!r}: not a file written by --export ({type(e).__name__}: {e}); {expected}'
        ) from e
    params = variables.get('params') if isinstance(variables, dict) else None
    if not isinstance(params, dict) or 'bias' not in params.get('head', {}):
        raise ValueError(f'{what} {path!r} holds no params/head/bias; {expected}')
    weights.check_finite(variables, f'{what} {path!r}')
    return variables


def export_run(run: Any, path: str) -> str:
    """Writes what `run` (`evaluation.Run`) evaluates with to `path`, in the format its suffix
    names, with the run's own input: its normalisation inside and uint8 images of its eval
    size; no dataset is read. Returns what was written, in words."""
    shape = run.input.network_shape()
    fmt = export(
        path, run.model, run.variables, mean=run.input.mean, std=run.input.std, image_shape=shape
    )
    if fmt == 'msgpack':
        return 'msgpack variables (serving.load_exported)'
    name = 'StableHLO (jax.export)' if fmt == 'stablehlo' else 'ONNX'
    return (
        f'{name}: uint8 images (batch, {", ".join(map(str, shape))}) -> logits, '
        f'normalisation {run.config.dataset.normalization!r} inside'
    )


def _checked(image_shape: Sequence[int], mean: Any) -> tuple[int, ...]:
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3:
        raise ValueError(f'image_shape {shape}: expected (height, width, channels)')
    mean_shape = np.shape(mean)
    if mean_shape not in (shape[-1:], shape):
        raise ValueError(f'mean of shape {mean_shape} does not fit images of shape {shape}')
    return shape


def _find_spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken install
        return None


def _missing(package: str) -> ValueError:
    return ValueError(f'ONNX export needs {package}, which is not installed: {EXPORT_EXTRA}')


@contextlib.contextmanager
def _quiet_jax2onnx() -> Iterator[None]:
    """jax2onnx 0.13 prints debug lines and logs a traceback for each optional plugin that
    does not import (dm_pix's, under jax 0.10): noise on the command's output, not errors."""
    log = logging.getLogger('jax2onnx')
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def _import_onnx_exporter() -> Callable:
    try:
        import onnx  # noqa: F401  (jax2onnx's own dependency; checked so the message names it)
    except ImportError:
        raise _missing('onnx') from None
    try:
        with _quiet_jax2onnx():
            from jax2onnx import to_onnx
    except ImportError:
        raise _missing('jax2onnx') from None
    return to_onnx
