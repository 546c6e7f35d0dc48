"""Config -> optax: learning-rate schedule, optimizer, weight decay and its mask, clipping.

The paper's recipe is SGD with momentum 0.9, weight decay 1e-4 added to the gradient (L2,
"coupled"), and the learning rate divided by 10 at fixed iterations. Everything else is a
config change:

    optimizer.name      sgd | momentum | nesterov | adamw | lamb | lars | any optax optimizer
    optimizer.kwargs    extra keyword arguments for that optimizer (b1, eps, trust_coefficient...)
    optimizer.learning_rate, optimizer.momentum
    optimizer.weight_decay, optimizer.weight_decay_mode (coupled | decoupled),
    optimizer.decay_bn_and_bias (False: decay only convolution and dense kernels)
    optimizer.grad_clip_norm (0: off)
    optimizer.schedule  piecewise | cosine | constant
    optimizer.boundaries / optimizer.boundaries_epochs, optimizer.decay_factor (piecewise)
    optimizer.warmup_steps, optimizer.warmup_mode (linear | constant),
    optimizer.warmup_learning_rate (the paper's ResNet-110 warm-up: constant 0.01 for 400 steps)
    optimizer.ema_decay (0: off) an exponential moving average of the model (parameters and
        BatchNorm statistics), kept in the train state (`TrainState.ema`) and used for
        evaluation and export
"""

from __future__ import annotations

import types
from typing import Any

import jax
import optax

NAMED_OPTIMIZERS = ('sgd', 'momentum', 'nesterov', 'adamw', 'lamb', 'lars')
SCHEDULES = ('piecewise', 'cosine', 'constant')
WEIGHT_DECAY_MODES = ('coupled', 'decoupled')
WARMUP_MODES = ('linear', 'constant')

# The paper's CIFAR optimizer as a plain object, for tools that run without the config system
# (benchmarks on machines that lack ml_collections or the data stack). Same values as
# resnet_jax.config.base_config().optimizer; tests/test_trainer.py checks that they agree.
PAPER_CIFAR_SGD = types.SimpleNamespace(
    name='momentum',
    kwargs={},
    learning_rate=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    weight_decay_mode='coupled',
    decay_bn_and_bias=True,
    grad_clip_norm=0.0,
    schedule='piecewise',
    boundaries=[32_000, 48_000],
    boundaries_epochs=[],
    decay_factor=0.1,
    warmup_steps=0,
    warmup_mode='constant',
    warmup_learning_rate=0.01,
    ema_decay=0.0,
)


def is_known_optimizer(name: str) -> bool:
    """A name from NAMED_OPTIMIZERS or of an optimizer factory in optax (adam, rmsprop...)."""
    return name in NAMED_OPTIMIZERS or callable(getattr(optax, name, None))


def weight_decay_mask(params: Any, decay_bn_and_bias: bool) -> Any:
    """True where weight decay applies: everything, or only convolution and dense kernels.

    Decided by name, not rank: scanned BatchNorm scales are 2-D (blocks x channels).
    """
    if decay_bn_and_bias:
        return jax.tree.map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'kernel', params)


def learning_rate_schedule(cfg: Any, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """The schedule of `cfg` (the `optimizer` config) as a function of the step."""
    base = cfg.learning_rate
    if cfg.schedule == 'constant':
        main = optax.constant_schedule(base)
    elif cfg.schedule == 'cosine':
        main = optax.cosine_decay_schedule(base, max(1, total_steps - cfg.warmup_steps))
    elif cfg.schedule == 'piecewise':
        boundaries = list(cfg.boundaries) + [
            int(e * steps_per_epoch) for e in cfg.boundaries_epochs
        ]
        # Boundaries count from the start of training, warm-up included (as the paper's 32k/48k).
        main = optax.piecewise_constant_schedule(
            base, {b - cfg.warmup_steps: cfg.decay_factor for b in sorted(boundaries)}
        )
    else:
        raise ValueError(
            f'optimizer.schedule {cfg.schedule!r} is invalid; expected one of {SCHEDULES}'
        )
    if not cfg.warmup_steps:
        return main
    if cfg.warmup_mode == 'linear':
        warmup = optax.linear_schedule(cfg.warmup_learning_rate, base, cfg.warmup_steps)
    else:
        warmup = optax.constant_schedule(cfg.warmup_learning_rate)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def create_optimizer(
    cfg: Any, params: Any, *, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain of `cfg` for `params` (used for the weight-decay mask only)."""
    schedule = learning_rate_schedule(cfg, total_steps, steps_per_epoch)
    mask = weight_decay_mask(params, cfg.decay_bn_and_bias)
    wd = cfg.weight_decay
    decoupled = cfg.weight_decay_mode == 'decoupled'
    kwargs = dict(cfg.kwargs)
    name = cfg.name
    if name in ('sgd', 'momentum', 'nesterov'):
        momentum = None if name == 'sgd' else cfg.momentum
        direction = [optax.trace(momentum, nesterov=name == 'nesterov')] if momentum else []
        if decoupled:  # decay scaled by the learning rate, as AdamW does
            direction.append(optax.add_decayed_weights(wd, mask))
        tx = optax.chain(*direction, optax.scale_by_learning_rate(schedule))
    elif name == 'adamw':
        tx = optax.adamw(schedule, weight_decay=wd if decoupled else 0.0, mask=mask, **kwargs)
    elif name == 'lamb':
        tx = optax.lamb(schedule, weight_decay=wd if decoupled else 0.0, mask=mask, **kwargs)
    elif name == 'lars':
        tx = optax.lars(
            schedule,
            weight_decay=wd if decoupled else 0.0,
            weight_decay_mask=mask,
            momentum=cfg.momentum,
            **kwargs,
        )
    else:
        if not is_known_optimizer(name):
            raise ValueError(
                f'optimizer.name {name!r} is not an optax optimizer; expected one of '
                f'{", ".join(NAMED_OPTIMIZERS)} or a function of optax such as adam, rmsprop'
            )
        if decoupled and wd:
            raise ValueError(
                f'optimizer {name!r} has no decoupled weight decay here; use weight_decay_mode='
                "'coupled' or pass its own option through optimizer.kwargs"
            )
        try:
            tx = getattr(optax, name)(schedule, **kwargs)
        except TypeError as e:
            raise ValueError(
                f'optimizer {name!r} rejected optimizer.kwargs {kwargs}: {e}'
            ) from None
    if wd and not decoupled:  # L2 in the gradient, as the paper (and Caffe) did
        tx = optax.chain(optax.add_decayed_weights(wd, mask), tx)
    if cfg.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx, schedule
