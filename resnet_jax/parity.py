"""Logit parity of converted weights against independent implementations (torchvision, Keras).

Builds each reference network with random weights, gives its BatchNorm layers random affine
parameters and running statistics measured on a calibration batch, rescales its head so the
logits have unit standard deviation, converts it with `resnet_jax.weights`, and compares
float32 logits on random images in eval mode. Needs the `parity` extra (torch, torchvision,
keras); nothing here is imported by the rest of the package.

    python -m resnet_jax parity                      # print the table
    python -m resnet_jax parity --write docs/weights.md

`tests/test_weights.py` runs the same cases and requires a max abs difference below 1e-4.
"""

from __future__ import annotations

import os
import platform

os.environ.setdefault('KERAS_BACKEND', 'jax')  # Keras runs on JAX here: no TensorFlow needed.

import jax.numpy as jnp
import numpy as np

import resnet_jax as rj
from resnet_jax import weights

# (our model name, reference, image size, scan_blocks)
CASES = [
    ('resnet18', 'torchvision', 224, False),
    ('resnet50', 'torchvision', 224, False),
    ('resnet152', 'torchvision', 128, True),
    ('resnet50', 'keras', 128, False),
    ('resnet101', 'keras', 128, True),
    ('resnet50d', 'timm', 128, False),
]
KERAS_CLASSES = {'resnet50': 'ResNet50', 'resnet101': 'ResNet101', 'resnet152': 'ResNet152'}


def torchvision_reference(name: str, image_size: int, seed: int = 0):
    """A torchvision ResNet in eval mode with non-trivial BatchNorm statistics."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    return _calibrated(getattr(torchvision.models, name)(), image_size)


def timm_reference(name: str, image_size: int, seed: int = 0):
    """A timm ResNet (resnet50d: ResNet-D) in eval mode with non-trivial BatchNorm statistics."""
    import timm
    import torch

    torch.manual_seed(seed)
    return _calibrated(timm.create_model(name, pretrained=False), image_size)


def _calibrated(ref, image_size: int):
    """`ref` with random BN affine parameters and running statistics of a random batch."""
    import torch

    for module in ref.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.normal_(module.bias, 0.0, 0.1)
            module.momentum = None  # cumulative average: running stats = calibration batch's
            module.reset_running_stats()
    # Trained ResNets have small scales on the last BN of each branch. With scales near 1 a
    # random 152-layer net amplifies float32 rounding to ~1e-3 in torch and JAX alike (each
    # measured against torch in float64), which would hide real mismatches.
    for module in ref.modules():
        last = getattr(module, 'bn3', None) or getattr(module, 'bn2', None)  # of a block
        if last is not None and hasattr(module, 'conv2'):
            torch.nn.init.uniform_(last.weight, 0.1, 0.4)
    ref.train()
    with torch.no_grad():
        ref(torch.randn(4, 3, image_size, image_size))
    ref.eval()
    return ref


def keras_reference(name: str, image_size: int, seed: int = 0):
    """A keras.applications ResNet (v1) with non-trivial BN statistics and conv biases."""
    import keras

    ref = getattr(keras.applications, KERAS_CLASSES[name])(
        weights=None, classifier_activation=None, input_shape=(image_size, image_size, 3)
    )
    rng = np.random.RandomState(seed)
    for layer in ref.layers:
        kind = type(layer).__name__
        if kind == 'BatchNormalization':
            gamma, beta, mean, var = layer.get_weights()
            low, high = (0.1, 0.4) if layer.name.endswith('_3_bn') else (0.5, 1.5)
            gamma = rng.uniform(low, high, gamma.shape)
            layer.set_weights([gamma, rng.normal(0, 0.1, beta.shape), mean, var])
            layer.momentum = 0.0  # the next training-mode call sets running stats = batch stats
        elif kind == 'Conv2D':
            kernel, bias = layer.get_weights()
            # Non-zero biases, so that folding them into the BN means is really exercised.
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
    ref(rng.randn(4, image_size, image_size, 3).astype(np.float32), training=True)
    return ref


def _normalise_torch_head(ref, images: np.ndarray):
    """Scales a torch reference's classifier so its logits on `images` have unit std; returns
    its logits function (NHWC numpy in, numpy out)."""
    import torch

    def ref_logits(x):
        with torch.no_grad():
            return ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()

    with torch.no_grad():
        std = float(np.std(ref_logits(images)))
        ref.fc.weight /= std
        ref.fc.bias /= std
    return ref_logits


def parity(name: str, reference: str, image_size: int, scan_blocks: bool) -> dict:
    """Converts a fresh reference and compares logits; returns the measured figures."""
    images = np.random.RandomState(1).randn(2, image_size, image_size, 3).astype(np.float32)
    if reference in ('torchvision', 'timm'):
        ref = (torchvision_reference if reference == 'torchvision' else timm_reference)(
            name, image_size
        )
        ref_logits = _normalise_torch_head(ref, images)
        if reference == 'torchvision':
            model = rj.create_model(
                name, num_classes=1000, stride_on='3x3', scan_blocks=scan_blocks
            )
            variables = weights.from_torchvision(ref.state_dict(), model)
        else:
            model = rj.create_model(name, num_classes=1000, scan_blocks=scan_blocks)
            variables = weights.from_timm(ref.state_dict(), model)
    elif reference == 'keras':
        ref = keras_reference(name, image_size)

        def ref_logits(x):
            return np.asarray(ref(x, training=False))

        head = ref.get_layer('predictions')
        std = float(np.std(ref_logits(images)))
        head.set_weights([w / std for w in head.get_weights()])
        model = rj.create_model(
            name, num_classes=1000, bn_epsilon=weights.KERAS_BN_EPSILON, scan_blocks=scan_blocks
        )
        variables = weights.from_keras(ref, model)
    else:
        raise ValueError(f'unknown reference {reference!r}; expected torchvision, timm or keras')
    want = ref_logits(images)
    got, _ = rj.apply_model(model, variables, jnp.asarray(images), train=False)
    return {
        'max_abs_diff': float(np.abs(np.asarray(got) - want).max()),
        'logit_std': float(np.std(want)),
    }


def render(rows: list[tuple]) -> str:
    lines = [
        '| model | reference | image | max abs logit difference | logit std |',
        '|---|---|---|---|---|',
    ]
    for name, reference, size, _, result in rows:
        lines.append(
            f'| {name} | {reference} | {size}x{size} | {result["max_abs_diff"]:.1e} '
            f'| {result["logit_std"]:.2f} |'
        )
    return '\n'.join(lines)


def table() -> str:
    """The parity table of every case, with the machine it was measured on."""
    rows = [(*case, parity(*case)) for case in CASES]
    machine = f'{platform.machine()} CPU, {os.cpu_count()} cores'
    return f'{render(rows)}\n\nMeasured by `python -m resnet_jax parity` on {machine}.'
