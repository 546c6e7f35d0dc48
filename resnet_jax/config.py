"""The experiment config: defaults every experiment shares, and one `validate` at the start.

`configs/*.py::get_config(arg)` start from `base_config()` and set what differs. `validate`
runs before anything touches the workdir and raises one ValueError naming the bad value and
what was expected. Derived values are formulas in the configs, not magic numbers here.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
from typing import Any

import ml_collections

from resnet_jax import (
    accelerators,
    augment,
    datasets,
    models,
    optim,
    options,
    paths,
    preprocessing,
    sharding,
)

DTYPES = ('float32', 'bfloat16')
NONFINITE_POLICIES = ('stop', 'skip')


def base_config() -> ml_collections.ConfigDict:
    """Every field an experiment has, with the paper's CIFAR-10 values where one applies.

    The `model` and `optimizer` sections are made from the code that uses them (the model's
    options, `optim.OptimizerConfig`), so a new option there is a new field here by itself.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = 'float32'
    c.batch_size = 128  # global, over all devices and processes
    # Rounded up to a multiple of the device count where it is not one (sharding.eval_batch_size).
    c.eval_batch_size = 512
    # Global batches a background thread keeps on the devices ahead of the step, so input
    # hiccups do not idle the accelerator (resnet_jax.prefetch); 0: each moved when needed.
    c.prefetch_batches = 2
    # Train steps per jitted call (lax.scan over that many batches): fewer dispatches for short
    # steps. Logging, evals, checkpoints and preemption checks happen between calls, so their
    # intervals must be multiples of it.
    c.steps_per_call = 1
    c.total_steps = 64_000
    c.log_every_steps = 100
    c.eval_every_steps = 2_000
    c.checkpoint_every_steps = 2_000
    c.keep_checkpoints = 3
    c.label_smoothing = 0.0
    # mixup / CutMix on the device (resnet_jax.mixing): Beta(alpha, alpha) mixing weights,
    # 0 turns one off; with both on, each example is CutMixed with probability cutmix_prob.
    c.mixup_alpha = 0.0
    c.cutmix_alpha = 0.0
    c.cutmix_prob = 0.5
    c.bn_group_size = 0  # 0: BN statistics of the global batch; N: of each group of N examples
    # A group that straddles devices (the per-device batch not a multiple of bn_group_size)
    # costs collectives in every BatchNorm layer (docs/scaling.md); refused unless set.
    c.bn_span_across_devices = False
    c.fsdp = False  # shard large parameters and optimizer state over `data` (ZeRO-3 style)
    c.fsdp_min_size = 2**18  # elements; smaller arrays stay replicated
    # A NaN or Inf in the loss or gradients: 'stop' (naming the step and the last checkpoint)
    # or 'skip' the update and count it. A non-finite state is never saved either way.
    c.nonfinite = 'stop'
    c.max_skipped_steps = 100  # 'skip' still stops after this many skips in one run

    # A fresh run starts from these weights (resnet_jax.pretrained): a PyTorch state dict, a
    # Keras .keras/.h5 file, an --export .msgpack or another run's workdir; '' = the paper's
    # initialisation. A resumed run ignores it.
    c.init_from = ''

    # XLA's persistent compilation cache: a restarted run skips compiling what it compiled
    # before. 'auto': <cache dir>/xla (RESNET_JAX_CACHE_DIR, default ~/.cache/resnet_jax); a
    # path (local or gs://, shared by the hosts of a pod); '' turns it off. A run of several
    # processes takes WORKDIR/xla_cache for 'auto': JAX writes entries from process 0 only, so
    # each host's local cache would stay empty but one (resnet_jax.compilation_cache).
    c.compilation_cache_dir = 'auto'
    # The accelerator the run must have: 'gpu' or 'tpu' stops a run that JAX would otherwise
    # start on the CPU (a CUDA plugin that did not load, a TPU held by another process) before
    # anything is written, naming the cause (resnet_jax.accelerators); '' takes what JAX finds.
    # JAX_PLATFORMS=cuda or tpu asks for the same.
    c.require_backend = ''

    # Seconds a checkpoint save, wait or restore may go without the store answering before the
    # run stops with one line (the last complete checkpoint intact): a bucket that cannot be
    # reached or authenticated must not hang a run without a word.
    c.storage_timeout_seconds = 300

    # Multi-process runs (train.py passes these to jax.distributed.initialize).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialization_timeout_seconds = 300  # all processes must join within this
    c.distributed.heartbeat_timeout_seconds = 60  # a silent peer fails the others after this

    # Every create_model option ('' = the preset's own value, e.g. shortcut A on CIFAR nets).
    c.model = ml_collections.ConfigDict({'name': 'resnet20', **models.option_defaults()})

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = 'cifar10_jpeg'  # a registered dataset (resnet_jax.datasets)
    c.dataset.data_dir = os.path.expanduser('~/.cache/resnet_jax/tfds')
    c.dataset.train_split = 'train_45k'
    c.dataset.eval_split = 'val_5k'
    c.dataset.test_split = 'test'
    c.dataset.augmentation = 'default'  # the dataset's own, or a chain such as pad_crop+cutout
    # Photographs (ImageNet family) are cropped to this side; 0: the paper's 224. The eval
    # resize (256) and the scale range ([256, 480]) follow in proportion. CIFAR: must be 0.
    c.dataset.image_size = 0
    c.dataset.normalization = 'pixel_mean'
    # Host decoding and augmentation: Grain worker processes (0: in the trainer's process),
    # each decoding the images of a batch with read_threads threads. A host needs about
    # (images/s of its accelerators) / (images/s of one core) cores for it: BENCHMARKS.md.
    c.dataset.num_workers = 0
    c.dataset.read_threads = 1
    # Decode the train split once, keep it on the devices (rows sharded over the mesh) and draw
    # and augment every batch there from (seed, step) (fixed-size datasets such as CIFAR;
    # in_memory.InMemoryBatches). The CIFAR configs turn it on.
    c.dataset.in_memory = False
    c.dataset.download = False

    c.optimizer = ml_collections.ConfigDict(dataclasses.asdict(optim.OptimizerConfig()))
    return c


_check = functools.partial(options.require, prefix='invalid config: ')


def _one_of(value: Any, allowed: Any, field: str) -> None:
    _check(value in allowed, f'{field}={value!r}; expected one of {", ".join(map(str, allowed))}')


def _positive_int(value: Any, field: str, zero_ok: bool = False) -> None:
    ok = options.is_int(value) and value >= (0 if zero_ok else 1)
    _check(ok, f'{field}={value!r}; expected a {"non-negative" if zero_ok else "positive"} int')


def validate(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> None:
    """Rejects unknown or inconsistent values with one clear message. Touches no files.

    The fields of this module are checked here; the model's options by `create_model`, the
    optimizer's by `optim.check_config` and the dataset's choices by the dataset registry and
    the augmentation and normalisation registries: each value where it is defined.
    """
    # total_steps=0: an evaluation-only run (e.g. of init_from weights): the state is saved
    # at step 0 and evaluated.
    _positive_int(config.total_steps, 'total_steps', zero_ok=True)
    for field in (
        'log_every_steps',
        'eval_every_steps',
        'checkpoint_every_steps',
        'keep_checkpoints',
    ):
        _positive_int(config[field], field)
    _positive_int(config.seed, 'seed', zero_ok=True)
    _positive_int(config.prefetch_batches, 'prefetch_batches', zero_ok=True)
    _positive_int(config.steps_per_call, 'steps_per_call')
    for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
        _check(
            config[field] % config.steps_per_call == 0,
            f'{field}={config[field]} is not a multiple of steps_per_call='
            f'{config.steps_per_call} (actions run between calls)',
        )
    _positive_int(config.fsdp_min_size, 'fsdp_min_size')
    _positive_int(config.storage_timeout_seconds, 'storage_timeout_seconds')
    _positive_int(config.bn_group_size, 'bn_group_size', zero_ok=True)
    _check(
        not config.bn_group_size or config.batch_size % config.bn_group_size == 0,
        f'bn_group_size={config.bn_group_size} does not divide batch_size={config.batch_size}',
    )
    try:
        sharding.check_batch_size(config.batch_size, device_count, process_count)
    except ValueError as e:
        _check(False, f'batch_size={config.batch_size!r} {e}')
    _check_bn_span(config, device_count)
    _positive_int(config.eval_batch_size, 'eval_batch_size')
    sharding.note_eval_batch_size(config.eval_batch_size, device_count, process_count)
    _one_of(config.dtype, DTYPES, 'dtype')
    _one_of(config.nonfinite, NONFINITE_POLICIES, 'nonfinite')
    _check(
        config.require_backend in accelerators.BACKENDS,
        f"require_backend={config.require_backend!r}; expected '' (any), 'gpu' or 'tpu'",
    )
    _positive_int(config.max_skipped_steps, 'max_skipped_steps', zero_ok=True)
    # '' turns these off (or means the default); ' ' would be a folder named ' ' (XLA creates
    # the cache there) and ' /x.pth' a file that does not exist, named as if it did.
    for field, value in (
        ('compilation_cache_dir', config.get('compilation_cache_dir')),
        ('init_from', config.get('init_from')),
        ('dataset.data_dir', config.dataset.data_dir),
    ):
        if value:
            try:
                paths.check_path_text(value, field)
            except ValueError as e:
                _check(False, str(e))
    _positive_int(
        config.distributed.initialization_timeout_seconds,
        'distributed.initialization_timeout_seconds',
    )
    _positive_int(
        config.distributed.heartbeat_timeout_seconds, 'distributed.heartbeat_timeout_seconds'
    )
    _check(
        0.0 <= config.label_smoothing < 1.0,
        f'label_smoothing={config.label_smoothing}; expected [0, 1)',
    )
    for field in ('mixup_alpha', 'cutmix_alpha'):
        # Inf passes `>= 0` and then draws NaN mixing weights from Beta(inf, inf).
        _check(
            options.is_finite_number(config[field]) and config[field] >= 0,
            f'{field}={config[field]}; expected a finite number >= 0 (0: off)',
        )
    _check(0.0 <= config.cutmix_prob <= 1.0, f'cutmix_prob={config.cutmix_prob}; expected [0, 1]')
    ds = config.dataset
    try:
        datasets.spec(ds.name)
        augment.parse_chain('' if ds.augmentation == 'default' else ds.augmentation)
    except ValueError as e:
        _check(False, f'dataset: {e}')
    _one_of(ds.normalization, preprocessing.NORMALIZATIONS, 'dataset.normalization')
    _positive_int(ds.num_workers, 'dataset.num_workers', zero_ok=True)
    _positive_int(ds.read_threads, 'dataset.read_threads')
    _positive_int(ds.image_size, 'dataset.image_size', zero_ok=True)
    if ds.image_size and datasets.spec(ds.name).family != 'imagenet':
        _check(
            False,
            f'dataset.image_size={ds.image_size}: {ds.name} images are used at their '
            'own size; expected 0',
        )
    optim.check_config(config.optimizer, config.total_steps)
    create_model_from_config(config, num_classes=10)  # the model checks its own options


def _check_bn_span(config: ml_collections.ConfigDict, device_count: int) -> None:
    """A BatchNorm span (`bn_group_size`) must lie inside one device unless
    `bn_span_across_devices` asks for spans that straddle devices."""
    span = config.bn_group_size
    if not span or config.bn_span_across_devices:
        return
    per_device = config.batch_size // device_count
    _check(
        per_device % span == 0,
        f'bn_group_size={span} straddles devices: batch_size={config.batch_size} over '
        f'{device_count} devices is {per_device} examples per device, not a multiple of {span}; '
        f'expected a bn_group_size that divides {per_device} (0: global statistics), or '
        'bn_span_across_devices=True to accept the collectives in every BatchNorm layer it '
        'costs (docs/scaling.md)',
    )


def create_model_from_config(config: ml_collections.ConfigDict, num_classes: int):
    """The model of `config.model` (every field but `name` is a create_model option)."""
    options = {
        key: value
        for key, value in config.model.items()
        if key != 'name'
        and not (value == '' and key in models.OPTIONS and models.OPTIONS[key].preset_default)
    }
    return models.create_model(
        config.model.name, num_classes=num_classes, dtype=config.dtype, **options
    )


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


def unknown_key(config: Any, key: str) -> str | None:
    """None if dotted `key` ('optimizer.learning_rate') names a field of `config`, else which
    part names none, and the field it most likely meant."""
    import difflib

    node, walked = config, []
    for part in key.split('.'):
        fields = list(node.keys()) if hasattr(node, 'keys') else []
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f'; did you mean {".".join([*walked, close[0]])}?' if close else ''
            return f'{part!r} is not a field of the config{hint}'
        node, walked = node[part], [*walked, part]
    return None


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Sets dotted keys ('optimizer.learning_rate') in place; strings parse as the field's type.

    Raises:
      ValueError: for a key the config does not have or a value of the wrong type, naming both.
    """
    for key, raw in overrides.items():
        problem = unknown_key(config, key)
        if problem is not None:
            raise ValueError(f'unknown config key {key}: {problem}')
        *parents, leaf = key.split('.')
        node = config
        for part in parents:
            node = node[part]
        current = node[leaf]
        value = _parse_value(raw, current) if isinstance(raw, str) else raw
        try:
            with node.unlocked():
                node[leaf] = value
        except TypeError:
            raise ValueError(
                f'config {key}={raw!r}: expected {type(current).__name__}, like {current!r}'
            ) from None
