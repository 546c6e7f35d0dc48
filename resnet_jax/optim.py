"""Config -> optax: learning-rate schedule, optimizer, weight decay and its mask, clipping.

The paper's recipe is SGD with momentum 0.9, weight decay 1e-4 added to the gradient (L2,
"coupled"), and the learning rate divided by 10 at fixed iterations. Everything else is a
config change (the fields and their defaults are `OptimizerConfig`, which the experiment
config's `optimizer` section is made from):

    optimizer.name      a registered optimizer (OPTIMIZERS: sgd, momentum, nesterov, adamw,
                        lamb, lars, momentum_gc) or any optax optimizer (adam, rmsprop, ...)
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
    optimizer.frozen    fine-tuning: patterns of parameter paths that get no updates
    optimizer.backbone_lr_multiplier  fine-tuning: learning-rate factor outside the head

A new optimizer is one `@register_optimizer(name)` function here (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from resnet_jax import options

SCHEDULES = ('piecewise', 'cosine', 'constant')
WEIGHT_DECAY_MODES = ('coupled', 'decoupled')
WARMUP_MODES = ('linear', 'constant')


@dataclasses.dataclass
class OptimizerConfig:
    """Every optimizer field with its default: the paper's CIFAR recipe (section 4.2).

    Tools that run without the config system (benchmarks on an accelerator image without
    ml_collections) pass `OptimizerConfig()` where a config's `optimizer` section would go.
    """

    name: str = 'momentum'
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_mode: str = 'coupled'
    decay_bn_and_bias: bool = True
    grad_clip_norm: float = 0.0
    schedule: str = 'piecewise'
    # Tuples, not lists: config_flags can override a tuple from the command line
    # (--config.optimizer.boundaries='(600, 900)'), a list not at all.
    boundaries: tuple[int, ...] = (32_000, 48_000)
    boundaries_epochs: tuple[float, ...] = ()
    decay_factor: float = 0.1
    warmup_steps: int = 0
    warmup_mode: str = 'constant'
    warmup_learning_rate: float = 0.01
    ema_decay: float = 0.0  # e.g. 0.9999; evaluation then uses the averaged model
    # Fine-tuning: regular expressions over parameter paths ('stem_conv/kernel',
    # 'stage1/block1/conv1/kernel'; re.search) whose parameters get no updates, and a factor on
    # the learning rate of every parameter outside the classifier head.
    frozen: tuple[str, ...] = ()
    backbone_lr_multiplier: float = 1.0
    # Gradients of N consecutive steps averaged into one update (optax.MultiSteps): the
    # update of an N times larger batch, in the memory of one. Steps, schedules and logs
    # still count micro-batches; BatchNorm statistics are still those of each micro-batch.
    accumulate_steps: int = 1


# --- The registry ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a registered optimizer gets: its config, the schedule and the weight-decay mask.

    `weight_decay` is what the optimizer should apply itself (decoupled mode); in coupled mode
    (L2 in the gradient, the paper's) it is 0 and the decay is added before the optimizer.
    """

    cfg: Any
    schedule: optax.Schedule
    mask: Any
    weight_decay: float


OptimizerFactory = Callable[[Setting], optax.GradientTransformation]
OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Registers `factory(setting) -> optax.GradientTransformation` as `optimizer.name=name`."""

    def register(factory: OptimizerFactory) -> OptimizerFactory:
        OPTIMIZERS[name] = factory
        return factory

    return register


def _sgd(setting: Setting, *, momentum: float | None, nesterov: bool = False, first=()):
    direction = [*first]
    if momentum:
        direction.append(optax.trace(momentum, nesterov=nesterov))
    if setting.weight_decay:  # decoupled: scaled by the learning rate, as AdamW does
        direction.append(optax.add_decayed_weights(setting.weight_decay, setting.mask))
    return optax.chain(*direction, optax.scale_by_learning_rate(setting.schedule))


@register_optimizer('sgd')
def _plain_sgd(s: Setting) -> optax.GradientTransformation:
    return _sgd(s, momentum=None)


@register_optimizer('momentum')
def _momentum(s: Setting) -> optax.GradientTransformation:
    return _sgd(s, momentum=s.cfg.momentum)


@register_optimizer('nesterov')
def _nesterov(s: Setting) -> optax.GradientTransformation:
    return _sgd(s, momentum=s.cfg.momentum, nesterov=True)


@register_optimizer('adamw')
def _adamw(s: Setting) -> optax.GradientTransformation:
    return optax.adamw(s.schedule, weight_decay=s.weight_decay, mask=s.mask, **dict(s.cfg.kwargs))


@register_optimizer('lamb')
def _lamb(s: Setting) -> optax.GradientTransformation:
    return optax.lamb(s.schedule, weight_decay=s.weight_decay, mask=s.mask, **dict(s.cfg.kwargs))


@register_optimizer('lars')
def _lars(s: Setting) -> optax.GradientTransformation:
    return optax.lars(
        s.schedule,
        weight_decay=s.weight_decay,
        weight_decay_mask=s.mask,
        momentum=s.cfg.momentum,
        **dict(s.cfg.kwargs),
    )


# A custom optax transformation, registered as an optimizer: docs/extending.md's example.
class CentralizeState(NamedTuple):
    """Gradient centralisation keeps no state."""


def centralize_gradients() -> optax.GradientTransformation:
    """Gradient centralisation (Yong et al., ECCV 2020): every convolution and dense kernel's
    gradient has its mean over all axes but the output one removed, so each output unit's
    weights move on the hyperplane of zero mean. Vectors (BN scales, biases) pass unchanged."""

    def init(params):
        del params
        return CentralizeState()

    def update(updates, state, params=None):
        del params

        def centralize(g):
            if g.ndim < 2:
                return g
            return g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True)

        return jax.tree.map(centralize, updates), state

    return optax.GradientTransformation(init, update)


@register_optimizer('momentum_gc')
def _momentum_centralized(s: Setting) -> optax.GradientTransformation:
    """The paper's SGD with momentum on centralised gradients."""
    return _sgd(s, momentum=s.cfg.momentum, first=[centralize_gradients()])


def is_known_optimizer(name: Any) -> bool:
    """A registered name, or that of an optimizer factory in optax (adam, rmsprop...)."""
    return isinstance(name, str) and (name in OPTIMIZERS or callable(getattr(optax, name, None)))


def _optax_optimizer(s: Setting, name: str) -> optax.GradientTransformation:
    if s.weight_decay:
        raise ValueError(
            f'optimizer {name!r} has no decoupled weight decay here; use weight_decay_mode='
            "'coupled' or pass its own option through optimizer.kwargs"
        )
    try:
        return getattr(optax, name)(s.schedule, **dict(s.cfg.kwargs))
    except TypeError as e:
        raise ValueError(
            f'optimizer {name!r} rejected optimizer.kwargs {dict(s.cfg.kwargs)}: {e}'
        ) from None


# --- Checking and building ---------------------------------------------------------------------


_require = functools.partial(options.require, prefix='invalid config: optimizer.')


def _finite(cfg: Any, field: str, ok: Callable[[float], bool], expected: str) -> None:
    value = getattr(cfg, field)
    _require(
        options.is_finite_number(value) and ok(value), f'{field}={value!r}; expected {expected}'
    )


def check_config(cfg: Any, total_steps: int) -> None:
    """Raises ValueError naming the first bad value of an `optimizer` config section."""
    _require(
        is_known_optimizer(cfg.name),
        f'name={cfg.name!r}; expected one of {", ".join(OPTIMIZERS)} or an optax optimizer such '
        'as adam',
    )
    for field, allowed in (
        ('schedule', SCHEDULES),
        ('weight_decay_mode', WEIGHT_DECAY_MODES),
        ('warmup_mode', WARMUP_MODES),
    ):
        _require(
            getattr(cfg, field) in allowed,
            f'{field}={getattr(cfg, field)!r}; expected one of {", ".join(allowed)}',
        )
    positive, non_negative = (lambda x: x > 0), (lambda x: x >= 0)
    _finite(cfg, 'learning_rate', positive, 'a finite number > 0')
    _finite(cfg, 'weight_decay', non_negative, 'a finite number >= 0')
    _finite(cfg, 'grad_clip_norm', non_negative, 'a finite number >= 0 (0: off)')
    # Momentum 1 never forgets a gradient; above 1, or below 0, updates grow without bound.
    _finite(cfg, 'momentum', lambda x: 0 <= x < 1, 'a number in [0, 1)')
    _finite(cfg, 'ema_decay', lambda x: 0 <= x < 1, 'a number in [0, 1) (0: off)')
    # 0 or less would stop or reverse learning at the first boundary; a NaN the whole run.
    _finite(cfg, 'decay_factor', positive, 'a finite number > 0')
    _finite(cfg, 'warmup_learning_rate', non_negative, 'a finite number >= 0')
    _finite(cfg, 'backbone_lr_multiplier', non_negative, 'a finite number >= 0')
    _require(
        isinstance(cfg.warmup_steps, int) and cfg.warmup_steps >= 0,
        f'warmup_steps={cfg.warmup_steps!r}; expected a non-negative int',
    )
    _require(
        cfg.warmup_steps == 0 or total_steps == 0 or cfg.warmup_steps < total_steps,
        f'warmup_steps={cfg.warmup_steps} must be below total_steps={total_steps}',
    )
    _require(
        isinstance(cfg.frozen, (tuple, list)) and all(isinstance(p, str) for p in cfg.frozen),
        f'frozen={cfg.frozen!r}; expected a tuple of regular expressions over parameter paths',
    )
    for pattern in cfg.frozen:
        try:
            re.compile(pattern)
        except re.error as e:
            _require(False, f'frozen has {pattern!r}, not a regular expression: {e}')
    _require(
        isinstance(cfg.accumulate_steps, int)
        and not isinstance(cfg.accumulate_steps, bool)
        and cfg.accumulate_steps >= 1,
        f'accumulate_steps={cfg.accumulate_steps!r}; expected a positive int',
    )
    # MultiSteps applies an update every N micro-batches: the last total_steps % N would be
    # computed and never applied.
    _require(
        total_steps % cfg.accumulate_steps == 0,
        f'accumulate_steps={cfg.accumulate_steps} does not divide total_steps={total_steps}: '
        f'the last {total_steps % cfg.accumulate_steps} micro-batches would never be applied',
    )
    _check_boundaries(cfg)


def _check_boundaries(cfg: Any) -> None:
    """`boundaries` (steps counted from the start, warm-up included) and `boundaries_epochs`.

    Each must be increasing: the schedule sorts them, and merges repeats into one decay (a dict
    of step -> factor), so (400, 400) would decay once, not twice. A boundary at step 0 or
    inside the warm-up would decay the learning rate before it was ever used.
    """
    _require(
        isinstance(cfg.boundaries, (tuple, list))
        and all(options.is_int(b) for b in cfg.boundaries),
        f'boundaries={cfg.boundaries!r}; expected a tuple of steps (ints)',
    )
    _require(
        isinstance(cfg.boundaries_epochs, (tuple, list))
        and all(options.is_finite_number(e) for e in cfg.boundaries_epochs),
        f'boundaries_epochs={cfg.boundaries_epochs!r}; expected a tuple of finite numbers',
    )
    first = _first_boundary(cfg)
    for boundary in cfg.boundaries:
        _require(
            boundary >= first,
            f'boundaries has {boundary}; expected steps >= {first} (after step 0 and the '
            f'warm-up of warmup_steps={cfg.warmup_steps})',
        )
    for epoch in cfg.boundaries_epochs:
        _require(epoch > 0, f'boundaries_epochs has {epoch!r}; expected epochs > 0')
    for field in ('boundaries', 'boundaries_epochs'):
        values = tuple(getattr(cfg, field))
        _require(
            all(a < b for a, b in itertools.pairwise(values)),
            f'{field}={values!r}; expected increasing values, each once',
        )


def _first_boundary(cfg: Any) -> int:
    return max(cfg.warmup_steps, 1)


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
        _check_boundary_steps(cfg, boundaries, steps_per_epoch)
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


def _check_boundary_steps(cfg: Any, steps: list[int], steps_per_epoch: int) -> None:
    """Boundaries in epochs become steps only here, where the epoch's length is known: they
    must not land on step 0, inside the warm-up, or on another boundary (merged into one)."""
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    early = [s for s in steps if s < _first_boundary(cfg)]
    _require(
        not repeated and not early,
        f'boundaries_epochs={tuple(cfg.boundaries_epochs)!r} at {steps_per_epoch} steps per '
        f'epoch, with boundaries={tuple(cfg.boundaries)!r}, give the steps {sorted(steps)}: '
        + (f'{repeated} twice' if repeated else f'{early} before step {_first_boundary(cfg)}')
        + '; expected distinct steps after step 0 and the warm-up',
    )


def create_optimizer(
    cfg: Any, params: Any, *, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain of `cfg` for `params` (used for the weight-decay mask only)."""
    schedule = learning_rate_schedule(cfg, total_steps, steps_per_epoch)
    accumulate = cfg.accumulate_steps
    # Under MultiSteps the inner optimizer counts updates; its schedule is read at the
    # trainer's step (update * N), so boundaries and warmup keep meaning trainer steps.
    inner_schedule = schedule if accumulate == 1 else (lambda count: schedule(count * accumulate))
    mask = weight_decay_mask(params, cfg.decay_bn_and_bias)
    decoupled = cfg.weight_decay_mode == 'decoupled'
    setting = Setting(cfg, inner_schedule, mask, cfg.weight_decay if decoupled else 0.0)
    if cfg.name in OPTIMIZERS:
        tx = OPTIMIZERS[cfg.name](setting)
    elif is_known_optimizer(cfg.name):
        tx = _optax_optimizer(setting, cfg.name)
    else:
        raise ValueError(
            f'optimizer.name {cfg.name!r} is not an optax optimizer; expected one of '
            f'{", ".join(OPTIMIZERS)} or a function of optax such as adam, rmsprop'
        )
    if cfg.weight_decay and not decoupled:  # L2 in the gradient, as the paper (and Caffe) did
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask), tx)
    if cfg.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    tx = _fine_tuning(tx, cfg, params)
    if accumulate > 1:
        # Summed in float32 at least (bfloat16 would lose small gradients), float64 for float64.
        dtypes = [jnp.float32, *(leaf.dtype for leaf in jax.tree.leaves(params))]
        tx = optax.MultiSteps(
            tx, every_k_schedule=accumulate, accumulator_dtype=jnp.result_type(*dtypes)
        )
    return tx, schedule


def parameter_path(path: tuple) -> str:
    """'stage1/block1/conv1/kernel': how `optimizer.frozen` patterns see a parameter."""
    return '/'.join(str(getattr(k, 'key', k)) for k in path)


def fine_tuning_labels(cfg: Any, params: Any) -> Any:
    """Per parameter: 'frozen' (matches `cfg.frozen`), 'backbone' (outside the head, when
    `backbone_lr_multiplier` != 1) or 'train'.

    Raises:
      ValueError: naming a pattern of `cfg.frozen` that matches no parameter (a typo would
        otherwise freeze nothing, silently).
    """
    patterns = [re.compile(p) for p in cfg.frozen]
    used = set()

    def label(path: tuple, _: Any) -> str:
        name = parameter_path(path)
        matching = {p.pattern for p in patterns if p.search(name)}
        used.update(matching)
        if matching:
            return 'frozen'
        if cfg.backbone_lr_multiplier != 1 and not name.startswith('head/'):
            return 'backbone'
        return 'train'

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = [p.pattern for p in patterns if p.pattern not in used]
    if unused:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        examples = sorted(parameter_path(path) for path, _ in leaves)[:3]
        _require(
            False,
            f'frozen has {unused[0]!r}, which matches no parameter; paths look like '
            f'{", ".join(examples)}',
        )
    return labels


def _fine_tuning(tx: optax.GradientTransformation, cfg: Any, params: Any):
    """`tx`, with frozen parameters left unchanged and the backbone's updates scaled.

    Unchanged (and so with the same optimizer state) unless a fine-tuning field is set.
    """
    if not cfg.frozen and cfg.backbone_lr_multiplier == 1:
        return tx
    transforms = {
        'train': tx,
        # Scaling the updates scales the learning rate, for SGD and adaptive methods alike.
        'backbone': optax.chain(tx, optax.scale(cfg.backbone_lr_multiplier)),
        'frozen': optax.set_to_zero(),
    }
    return optax.multi_transform(transforms, fine_tuning_labels(cfg, params))
