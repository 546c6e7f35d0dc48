"""A minimal plain-Flax ResNet and train step, the peer our train step is measured against.

Written for the benchmark in the style of google/flax's examples/imagenet (its models.py and
train.py, reduced), deliberately *not* importing resnet_jax: the point is to measure what a
straightforward Flax implementation of the same network costs on the same device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

ModuleDef = Any


class ResNetBlock(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm()(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides)(residual)
            residual = self.norm()(residual)
        return nn.relu(residual + y)


class BottleneckResNetBlock(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (1, 1))(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3), self.strides)(y)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm()(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides)(residual)
            residual = self.norm()(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    cifar: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
        )
        if self.cifar:
            x = nn.relu(norm()(conv(self.num_filters, (3, 3))(x)))
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)])(x)
            x = nn.relu(norm()(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm)(
                    x
                )
        x = jnp.mean(x, axis=(1, 2))
        return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), jnp.float32)


def create(name: str, num_classes: int, dtype: Any) -> ResNet:
    if name == 'resnet20':
        return ResNet((3, 3, 3), ResNetBlock, num_classes, 16, cifar=True, dtype=dtype)
    if name == 'resnet50':
        return ResNet((3, 4, 6, 3), BottleneckResNetBlock, num_classes, dtype=dtype)
    if name == 'resnet18':
        return ResNet((2, 2, 2, 2), ResNetBlock, num_classes, dtype=dtype)
    raise ValueError(f'flax_reference has no {name!r}; expected resnet20, resnet18 or resnet50')


def make_train_step(model: ResNet, tx: optax.GradientTransformation, weight_decay: float = 1e-4):
    """The flax example's step: L2 penalty in the loss, mutable batch_stats, accuracy."""

    def train_step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {'params': params, 'batch_stats': batch_stats},
                images,
                mutable=['batch_stats'],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            weight_l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(params) if x.ndim > 1)
            return loss + 0.5 * weight_decay * weight_l2, (logits, updates['batch_stats'])

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return optax.apply_updates(params, updates), new_stats, opt_state, (loss, accuracy)

    return train_step
