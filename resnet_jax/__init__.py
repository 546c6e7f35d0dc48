"""resnet_jax: the networks of "Deep Residual Learning for Image Recognition" in JAX/Flax.

The public surface, re-exported on purpose. Everything else is an implementation detail.
"""

from resnet_jax import weights
from resnet_jax.counting import count_flops, count_params
from resnet_jax.models import (
    CIFAR_MODELS,
    IMAGENET_MODELS,
    MODEL_NAMES,
    OPTION_NAMES,
    ResNet,
    apply_model,
    create_model,
    init_variables,
    register_model,
)

__all__ = [
    'CIFAR_MODELS',
    'IMAGENET_MODELS',
    'MODEL_NAMES',
    'OPTION_NAMES',
    'ResNet',
    'apply_model',
    'count_flops',
    'count_params',
    'create_model',
    'init_variables',
    'register_model',
    'weights',
]
