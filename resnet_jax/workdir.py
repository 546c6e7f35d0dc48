"""A run's workdir: the config the run was started with, what its labels mean, and what its
checkpoints are of (its one writer's lock: resnet_jax.lock).

    WORKDIR/
      lock.json        held by the trainer (process 0) while it runs (resnet_jax.lock)
      config.json      the run's config, written once it has started (`read_config`)
      class_names.json the dataset's class names at the start, the meaning of each label
      metrics.jsonl    one JSON object per line (resnet_jax.metrics)
      tensorboard/     event files
      checkpoints/N/   Orbax steps, each with the run's identity and config (resnet_jax.checkpoint)
      bad_checkpoints/ steps that failed verification, set aside, never deleted
      previous/TIME/   the records of an earlier start that left no usable checkpoint

A start is checked against these records before anything is written (`check_start`), and
writes its own only once it has really started (`record_start`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import ml_collections
import numpy as np

from resnet_jax import checkpoint, optim, paths
from resnet_jax import config as config_lib

logger = logging.getLogger('resnet_jax')

CONFIG_FILE = 'config.json'
CLASS_NAMES_FILE = 'class_names.json'


# --- The recorded config ---------------------------------------------------------------------


def read_config(workdir: str, *, from_checkpoint: bool = True) -> ml_collections.ConfigDict:
    """The config recorded in `workdir`: config.json, written when its run started, or, where
    that is missing or damaged (and `from_checkpoint`), the config its newest checkpoint was
    saved under.

    Raises:
      ValueError: naming the file, if the workdir has neither, or its config.json is damaged
        and it has no checkpoint that records one; naming the workdir, if it is empty or has
        blanks around it (`paths.check_path_text`).
    """
    paths.check_path_text(workdir, 'workdir')
    paths.check_supported(workdir, 'workdir')
    workdir = paths.normalize(workdir)
    try:
        return _read_config_file(paths.join(workdir, CONFIG_FILE))
    except ValueError:
        saved = _newest_checkpoint_config(workdir) if from_checkpoint else None
        if saved is None:
            raise
        return saved


def _read_config_file(path: str) -> ml_collections.ConfigDict:
    # The remedies say what works: every command that reads a workdir takes --config.
    try:
        values = json.loads(paths.read_text(path))
    except FileNotFoundError:
        raise ValueError(
            f'{path} does not exist; expected the workdir of a run started by train.py, or pass '
            "--config=FILE (the run's config file)"
        ) from None
    except (OSError, ValueError) as e:
        reason = ' '.join(str(e).split())[:200]
        raise ValueError(
            f"{path} is not a readable config ({reason}); pass --config=FILE (the run's config "
            'file): its checkpoints check that it matches, and train.py then rewrites config.json'
        ) from None
    if not isinstance(values, dict) or 'model' not in values:
        raise ValueError(
            f"{path} is not a run config (no model section); pass --config=FILE (the run's "
            'config file)'
        )
    return config_from_values(values)


def _newest_checkpoint_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config the newest committed checkpoint was saved under, if it records one."""
    directory = paths.join(workdir, 'checkpoints')
    steps = checkpoint.committed_steps(directory)
    if not steps:
        return None
    try:
        saved = checkpoint.read_meta_of(directory, steps[-1]).get('config')
    except ValueError:
        return None
    return config_from_values(saved) if isinstance(saved, dict) else None


def config_from_values(values: dict[str, Any]) -> ml_collections.ConfigDict:
    """A recorded config (config.json, or a checkpoint's record of it) as a ConfigDict."""
    # A run recorded before a field existed ran as if it held the field's default.
    return ml_collections.ConfigDict(_lists_as_tuples(_with_defaults(values, _base_values())))


def _base_values() -> dict[str, Any]:
    return json.loads(config_json(config_lib.base_config()))


def _with_defaults(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    merged = dict(values)
    for key, default in defaults.items():
        if key not in merged:
            merged[key] = default
        elif isinstance(default, dict) and isinstance(merged[key], dict):
            merged[key] = _with_defaults(merged[key], default)
    return merged


def _lists_as_tuples(value: Any) -> Any:
    """JSON has no tuples; the config's sequences are tuples (config_flags overrides those)."""
    if isinstance(value, dict):
        return {k: _lists_as_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_as_tuples(v) for v in value)
    return value


def config_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(indent=1, sort_keys=True)


# --- What the labels mean ----------------------------------------------------------------------


def read_class_names(workdir: str) -> tuple[str, ...] | None:
    """The class names recorded when the run started, or None (a run from before they were)."""
    path = paths.join(paths.normalize(workdir), CLASS_NAMES_FILE)
    if not paths.exists(path):
        return None
    try:
        names = json.loads(paths.read_text(path))
    except (OSError, ValueError) as e:
        raise ValueError(
            f'{path} is not readable ({e}); delete it to record the names again'
        ) from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f'{path} is not a list of class names; delete it to record them again')
    return tuple(names)


def check_class_names(workdir: str, class_names: tuple[str, ...]) -> None:
    """Checks the dataset's class names against those the run recorded at its start, if any: a
    dataset whose classes changed (a class folder added or renamed) would give the labels of
    the checkpoints another meaning.

    Raises:
      ValueError: naming the classes that differ.
    """
    recorded = read_class_names(workdir) if class_names else None
    if recorded is not None and recorded != tuple(class_names):
        gone = [n for n in recorded if n not in class_names]
        new = [n for n in class_names if n not in recorded]
        what = f'missing now: {gone}, new: {new}' if gone or new else 'the same names, reordered'
        raise ValueError(
            f"the dataset's classes are not those this run in {workdir!r} was trained on "
            f'({what}; recorded in {CLASS_NAMES_FILE}): use a workdir of its own for this data'
        )


# --- The data stream a resumed run continues -------------------------------------------------

# Config fields that decide which examples each global batch holds and how they are augmented
# (the stream is a function of (seed, step) given these): a run resumed under other values
# would continue with another stream, so neither exactly nor as the run it claims to be.
STREAM_FIELDS = (
    'seed',
    'batch_size',
    'dataset.train_split',
    'dataset.augmentation',
    'dataset.image_size',
    'dataset.in_memory',  # the device stream draws other batches than the host's
)


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for key in dotted.split('.'):
        value = value[key]
    return value


def check_stream(
    recorded: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str
) -> None:
    """Raises ValueError naming every `STREAM_FIELDS` value where `config` differs from the
    config the run in `workdir` was saved under (`recorded`: a checkpoint's record, or
    config.json as `read_config` returns it)."""
    differ = [f for f in STREAM_FIELDS if _get(recorded, f) != _get(config, f)]
    if differ:
        values = ', '.join(
            f'{f}={_get(recorded, f)!r} (this config: {_get(config, f)!r})' for f in differ
        )
        flags = ' '.join(f'--config.{f}={_get(recorded, f)}' for f in differ)
        raise ValueError(
            f'the run in {workdir!r} draws its batches with {values}; resumed under other '
            f'values it would not continue its own data stream: pass {flags}, or omit --config '
            "to take the workdir's own, or use another workdir"
        )


def check_schedule(
    recorded: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    step: int,
    steps_per_epoch: int,
    workdir: str,
) -> None:
    """Raises ValueError when resuming at `step` under `config` would change the learning rate
    the run had there: a schedule laid out over `total_steps` (cosine, warm-up, boundaries in
    epochs) restarts mid-way when a finished run is resumed with more steps."""
    if recorded.total_steps == config.total_steps:
        return

    def rate(c: ml_collections.ConfigDict) -> float:
        schedule = optim.learning_rate_schedule(c.optimizer, c.total_steps, steps_per_epoch)
        return float(schedule(step))

    before, after = rate(recorded), rate(config)
    if not np.isclose(before, after, rtol=1e-6, atol=0.0):
        raise ValueError(
            f'the run in {workdir!r} was scheduled for total_steps={recorded.total_steps} '
            f'({recorded.optimizer.schedule}); resumed at step {step} with '
            f'total_steps={config.total_steps} its learning rate would jump from {before:.4g} '
            f'to {after:.4g}: keep --config.total_steps={recorded.total_steps}, or train on '
            f'from it in a new workdir with --config.init_from={workdir}'
        )


# --- What a checkpoint is of -----------------------------------------------------------------

# Config fields that decide what the network computes from its input, and what the state
# holds: a checkpoint is usable only under the same values. (dtype, the learning rate and the
# schedule may change between runs of one network; these may not.)
IDENTITY_FIELDS = (
    'dataset.name',
    'dataset.normalization',
    'optimizer.name',
    'optimizer.frozen',  # both shape the optimizer state (optax.multi_transform)
    'optimizer.backbone_lr_multiplier',
    'optimizer.accumulate_steps',  # optax.MultiSteps keeps its own state
)
# Model fields that change memory use, never the numbers: they may differ between runs.
MEMORY_ONLY_FIELDS = ('model.remat',)
# Identity fields added after checkpoints were written, with the value those checkpoints had.
ADDED_LATER = {
    'model.freeze_bn': False,
    'optimizer.frozen': [],
    'optimizer.backbone_lr_multiplier': 1.0,
    'optimizer.accumulate_steps': 1,
}


def identity(config: ml_collections.ConfigDict, model: Any) -> dict[str, Any]:
    """Every value that makes a checkpoint what it is: the network (all model fields, with the
    shortcut the model resolved and its number of classes), the input normalisation it was
    trained on, and the optimizer whose state it holds."""
    fields = {f'model.{k}': v for k, v in config.model.to_dict().items()}
    for dotted in MEMORY_ONLY_FIELDS:
        fields.pop(dotted, None)
    fields['model.shortcut'] = model.shortcut or ''
    fields['model.num_classes'] = int(model.num_classes)
    for dotted in IDENTITY_FIELDS:
        section, key = dotted.split('.')
        fields[dotted] = config[section][key]
    fields['optimizer.ema'] = bool(config.optimizer.ema_decay)
    return json.loads(json.dumps(fields, sort_keys=True))  # plain JSON values, as stored


def check_identity(recorded: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raises ValueError naming every field where `recorded` (a checkpoint's) differs."""
    recorded = {**ADDED_LATER, **recorded}
    differ = [
        f'{k}={recorded.get(k)!r} (this config: {expected.get(k)!r})'
        for k in sorted(set(recorded) | set(expected))
        if recorded.get(k) != expected.get(k)
    ]
    if differ:
        raise ValueError(
            f'{where} is of another network or optimizer: {", ".join(differ)}. Use the config '
            "it was trained with (omit --config to take the workdir's own), or another workdir"
        )


# --- A start: checked against the workdir's record before anything is written ---------------

PREVIOUS_DIR = 'previous'  # an earlier start's records, moved aside when a run starts over
# What an earlier start that left no usable checkpoint wrote, and a new start would replace.
EARLIER_RECORDS = ('metrics.jsonl', 'tensorboard', checkpoint.QUARANTINE_DIR)


@dataclasses.dataclass(frozen=True)
class Start:
    """What a start found in its workdir, for `record_start` once the run has started."""

    workdir: str
    resuming: bool  # it has a committed checkpoint
    recorded: ml_collections.ConfigDict | None  # config.json, where it is readable
    damaged: str | None  # why config.json cannot be read, where it exists
    earlier: tuple[str, ...]  # an earlier start's records (fresh starts only): moved aside


def _recorded_or_problem(workdir: str) -> tuple[ml_collections.ConfigDict | None, str | None]:
    if not paths.exists(paths.join(workdir, CONFIG_FILE)):
        return None, None
    try:
        return read_config(workdir, from_checkpoint=False), None
    except ValueError as e:
        return None, str(e)


def check_start(
    workdir: str,
    config: ml_collections.ConfigDict,
    expected: dict[str, Any],
    class_names: tuple[str, ...],
    *,
    steps: list[int],
    start_over: bool,
) -> Start:
    """Checks a start against what `workdir` records; reads only.

    Args:
      expected: the new run's `identity`; steps: the committed checkpoints.
      start_over: the user asked to start from step 0 where no checkpoint is usable.

    Raises:
      ValueError: a run of another network or classes; a start over asked for where there are
        checkpoints; a start from step 0 not asked for where a run's checkpoints were all set
        aside as damaged (it would throw the run away without a word).
    """
    recorded, damaged = _recorded_or_problem(workdir)
    if steps and start_over:
        raise ValueError(
            f'--start_over: {workdir!r} holds usable checkpoints (the latest is step '
            f'{steps[-1]}); starting over would discard them: resume (without --start_over), '
            'or use another workdir'
        )
    if recorded is not None and not start_over:
        model = config_lib.create_model_from_config(recorded, expected['model.num_classes'])
        where = f'the run in {workdir!r} ({paths.join(workdir, CONFIG_FILE)})'
        check_identity(identity(recorded, model), expected, where)
    if not start_over:
        check_class_names(workdir, class_names)
    earlier = ()
    if not steps:
        earlier = tuple(n for n in EARLIER_RECORDS if paths.exists(paths.join(workdir, n)))
        set_aside = paths.listdir(paths.join(workdir, checkpoint.QUARANTINE_DIR))
        if set_aside and not start_over:
            raise ValueError(
                f"no usable checkpoint in {workdir!r}: its run's checkpoints were damaged and set "
                f'aside in {checkpoint.QUARANTINE_DIR}/ ({", ".join(set_aside)}), so it would '
                "start over from step 0: pass --start_over to do that (the old run's records are "
                f'moved to {PREVIOUS_DIR}/), or move a good checkpoint back into checkpoints/'
            )
    return Start(workdir, bool(steps), recorded, damaged, earlier)


def record_start(start: Start, config: ml_collections.ConfigDict, class_names: tuple) -> None:
    """Writes the run's record once it has started (its state is ready and its first batch
    read): an earlier start's records moved aside, then config.json (a new run's, or in place
    of a damaged one) and class_names.json. Process 0 only."""
    import jax

    if jax.process_index() != 0:
        return
    workdir = start.workdir
    if start.earlier:
        _move_aside(workdir, start.earlier)
    if not start.resuming or start.recorded is None:
        if start.damaged and start.resuming:
            logger.warning(
                '%s was damaged: rewrote it with this config, which the checkpoint resumed from '
                'matches',
                paths.join(workdir, CONFIG_FILE),
            )
        paths.write_text(paths.join(workdir, CONFIG_FILE), config_json(config))
    if class_names and not paths.exists(paths.join(workdir, CLASS_NAMES_FILE)):
        paths.write_text(
            paths.join(workdir, CLASS_NAMES_FILE), json.dumps(list(class_names), indent=1)
        )


def _move_aside(workdir: str, names: tuple[str, ...]) -> None:
    """Moves an earlier start's records (and the config they were made under) to
    previous/<UTC time>/: a new start never deletes what an earlier one wrote."""
    target = paths.join(workdir, PREVIOUS_DIR, time.strftime('%Y%m%d-%H%M%S', time.gmtime()))
    moved = []
    for name in (*names, CONFIG_FILE, CLASS_NAMES_FILE):
        source = paths.join(workdir, name)
        if paths.exists(source):
            if not paths.is_url(target):
                os.makedirs(target, exist_ok=True)
            paths.move(source, paths.join(target, name))
            moved.append(name)
    logger.warning(
        'starting %s from step 0: moved the records of an earlier start (%s) to %s',
        workdir,
        ', '.join(moved),
        target,
    )
