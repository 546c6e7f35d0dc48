"""The experiment config: defaults every experiment shares, and one `validate` at the start.

`configs/*.py::get_config(arg)` start from `base_config()` and set what differs. `validate`
runs before anything touches the workdir and raises one ValueError naming the bad value and
what was expected. Derived values are formulas in the configs, not magic numbers here.
"""

from __future__ import annotations

import ast
import os
from typing import Any

import ml_collections

from resnet_jax import data, models, optim

DTYPES = ('float32', 'bfloat16')
NONFINITE_POLICIES = ('stop', 'skip')


def base_config() -> ml_collections.ConfigDict:
    """Every field an experiment has, with the paper's CIFAR-10 values where one applies."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = 'float32'
    c.batch_size = 128  # global, over all devices and processes
    c.eval_batch_size = 512
    c.total_steps = 64_000
    c.log_every_steps = 100
    c.eval_every_steps = 2_000
    c.checkpoint_every_steps = 2_000
    c.keep_checkpoints = 3
    c.label_smoothing = 0.0
    c.bn_group_size = 0  # 0: BN statistics of the global batch; N: of each group of N examples
    c.fsdp = False  # shard large parameters and optimizer state over `data` (ZeRO-3 style)
    c.fsdp_min_size = 2**18  # elements; smaller arrays stay replicated
    # A NaN or Inf in the loss or gradients: 'stop' (naming the step and the last checkpoint)
    # or 'skip' the update and count it. A non-finite state is never saved either way.
    c.nonfinite = 'stop'
    c.max_skipped_steps = 100  # 'skip' still stops after this many skips in one run

    # Multi-process runs (train.py passes these to jax.distributed.initialize).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialization_timeout_seconds = 300  # all processes must join within this
    c.distributed.heartbeat_timeout_seconds = 60  # a silent peer fails the others after this

    c.model = ml_collections.ConfigDict()
    c.model.name = 'resnet20'
    c.model.shortcut = ''  # '' = the family's default (A on CIFAR, B on ImageNet)
    c.model.stride_on = '1x1'
    c.model.zero_init_residual = False
    c.model.scan_blocks = False
    c.model.bn_momentum = 0.9
    c.model.bn_epsilon = 1e-5

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = 'cifar10_jpeg'
    c.dataset.data_dir = os.path.expanduser('~/.cache/resnet_jax/tfds')
    c.dataset.train_split = 'train_45k'
    c.dataset.eval_split = 'val_5k'
    c.dataset.test_split = 'test'
    c.dataset.augmentation = 'paper'
    c.dataset.normalization = 'pixel_mean'
    c.dataset.num_workers = 0
    c.dataset.download = False

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = 'momentum'
    c.optimizer.kwargs = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.weight_decay_mode = 'coupled'
    c.optimizer.decay_bn_and_bias = True
    c.optimizer.grad_clip_norm = 0.0
    c.optimizer.schedule = 'piecewise'
    c.optimizer.boundaries = [32_000, 48_000]
    c.optimizer.boundaries_epochs = ml_collections.FieldReference([], field_type=list)
    c.optimizer.decay_factor = 0.1
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_mode = 'constant'
    c.optimizer.warmup_learning_rate = 0.01
    c.optimizer.ema_decay = 0.0  # e.g. 0.9999; evaluation then uses the averaged parameters
    return c


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f'invalid config: {message}')


def _one_of(value: Any, allowed: tuple, field: str) -> None:
    _check(value in allowed, f'{field}={value!r}; expected one of {", ".join(map(str, allowed))}')


def _positive_int(value: Any, field: str, zero_ok: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if zero_ok else 1)
    _check(ok, f'{field}={value!r}; expected a {"non-negative" if zero_ok else "positive"} int')


def validate(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> None:
    """Rejects unknown or inconsistent values with one clear message. Touches no files."""
    for field in (
        'batch_size',
        'eval_batch_size',
        'total_steps',
        'log_every_steps',
        'eval_every_steps',
        'checkpoint_every_steps',
        'keep_checkpoints',
    ):
        _positive_int(config[field], field)
    _positive_int(config.seed, 'seed', zero_ok=True)
    _positive_int(config.fsdp_min_size, 'fsdp_min_size')
    _positive_int(config.bn_group_size, 'bn_group_size', zero_ok=True)
    _check(
        not config.bn_group_size or config.batch_size % config.bn_group_size == 0,
        f'bn_group_size={config.bn_group_size} does not divide batch_size={config.batch_size}',
    )
    for field in ('batch_size', 'eval_batch_size'):
        for count, what in ((device_count, 'devices'), (process_count, 'processes')):
            _check(
                config[field] % count == 0,
                f'{field}={config[field]} is not divisible by the {count} {what}; expected a '
                f'multiple of {count}',
            )
    _one_of(config.dtype, DTYPES, 'dtype')
    _one_of(config.nonfinite, NONFINITE_POLICIES, 'nonfinite')
    _positive_int(config.max_skipped_steps, 'max_skipped_steps', zero_ok=True)
    _positive_int(
        config.distributed.initialization_timeout_seconds,
        'distributed.initialization_timeout_seconds',
    )
    _positive_int(
        config.distributed.heartbeat_timeout_seconds, 'distributed.heartbeat_timeout_seconds'
    )
    _check(0.0 <= config.label_smoothing < 1.0, f'label_smoothing={config.label_smoothing}')
    _one_of(config.model.name, models.MODEL_NAMES, 'model.name')
    _one_of(config.model.shortcut, ('', *models.SHORTCUTS), 'model.shortcut')
    _one_of(config.model.stride_on, models.STRIDE_ON, 'model.stride_on')
    _one_of(config.dataset.augmentation, data.AUGMENTATIONS, 'dataset.augmentation')
    _one_of(config.dataset.normalization, data.NORMALIZATIONS, 'dataset.normalization')
    _positive_int(config.dataset.num_workers, 'dataset.num_workers', zero_ok=True)
    opt = config.optimizer
    _check(
        optim.is_known_optimizer(opt.name),
        f'optimizer.name={opt.name!r}; expected one of {", ".join(optim.NAMED_OPTIMIZERS)} or an '
        'optax optimizer such as adam',
    )
    _one_of(opt.schedule, optim.SCHEDULES, 'optimizer.schedule')
    _one_of(opt.weight_decay_mode, optim.WEIGHT_DECAY_MODES, 'optimizer.weight_decay_mode')
    _one_of(opt.warmup_mode, optim.WARMUP_MODES, 'optimizer.warmup_mode')
    _check(opt.learning_rate > 0, f'optimizer.learning_rate={opt.learning_rate}; expected > 0')
    _check(opt.weight_decay >= 0, f'optimizer.weight_decay={opt.weight_decay}; expected >= 0')
    _check(opt.grad_clip_norm >= 0, f'optimizer.grad_clip_norm={opt.grad_clip_norm}')
    _positive_int(opt.warmup_steps, 'optimizer.warmup_steps', zero_ok=True)
    _check(0.0 <= opt.ema_decay < 1.0, f'optimizer.ema_decay={opt.ema_decay}; expected [0, 1)')
    _check(
        opt.warmup_steps < config.total_steps,
        f'optimizer.warmup_steps={opt.warmup_steps} must be below total_steps={config.total_steps}',
    )
    for boundary in opt.boundaries:
        _check(
            isinstance(boundary, int) and opt.warmup_steps <= boundary,
            f'optimizer.boundaries has {boundary!r}; expected ints >= warmup_steps',
        )
    # The model options are checked by create_model itself, with the same kind of message.
    create_model_from_config(config, num_classes=10)


def create_model_from_config(config: ml_collections.ConfigDict, num_classes: int):
    m = config.model
    options = {
        'stride_on': m.stride_on,
        'zero_init_residual': m.zero_init_residual,
        'scan_blocks': m.scan_blocks,
        'bn_momentum': m.bn_momentum,
        'bn_epsilon': m.bn_epsilon,
        'dtype': config.dtype,
    }
    if m.shortcut:
        options['shortcut'] = m.shortcut
    return models.create_model(m.name, num_classes=num_classes, **options)


def _parse_value(text: str, current: Any) -> Any:
    """A command-line value as the type of the field it replaces ('0.1', '[1, 2]', 'adamw')."""
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, bool) and text.lower() in ('true', 'false'):
        value = text.lower() == 'true'
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        value = type(current)(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Sets dotted keys ('optimizer.learning_rate') in place; strings parse as the field's type.

    Raises:
      ValueError: for a key the config does not have or a value of the wrong type, naming both.
    """
    for key, raw in overrides.items():
        *parents, leaf = key.split('.')
        node = config
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(f'unknown config key {".".join(parents[: i + 1])!r} (in {key!r})')
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f'unknown config key {key!r}')
        current = node[leaf]
        value = _parse_value(raw, current) if isinstance(raw, str) else raw
        try:
            with node.unlocked():
                node[leaf] = value
        except TypeError:
            raise ValueError(
                f'config {key}={raw!r}: expected {type(current).__name__}, like {current!r}'
            ) from None
