"""A run's workdir: one writer at a time, the config the run was started with, and what its
checkpoints are of.

    WORKDIR/
      lock.json        held by the trainer (process 0) while it runs (`WorkdirLock`)
      config.json      the run's config, written when it starts; `get_config` reads it back
      class_names.json the dataset's class names at the start, the meaning of each label
      metrics.jsonl    one JSON object per line (resnet_jax.metrics)
      tensorboard/     event files
      checkpoints/N/   Orbax steps, each with the run's identity (resnet_jax.checkpoint)
      bad_checkpoints/ steps that failed verification, set aside, never deleted

This file is also a config file for `--config`: `--config=resnet_jax/workdir.py:WORKDIR` is the
config recorded in WORKDIR, which `evaluate` uses when no `--config` is given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import ml_collections

from resnet_jax import paths

logger = logging.getLogger('resnet_jax')

CONFIG_FILE = 'config.json'
CLASS_NAMES_FILE = 'class_names.json'
LOCK_FILE = 'lock.json'
_HELD_TOKENS: set[str] = set()  # the locks this process holds now


# --- The recorded config ---------------------------------------------------------------------


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config recorded in `workdir` when its run started.

    Raises:
      ValueError: naming the file, if the workdir has none or it is not a config; naming the
        workdir, if it is empty or has blanks around it (`paths.check_path_text`).
    """
    paths.check_path_text(workdir, 'workdir')
    paths.check_supported(workdir, 'workdir')
    path = paths.join(paths.normalize(workdir), CONFIG_FILE)
    try:
        values = json.loads(paths.read_text(path))
    except FileNotFoundError:
        raise ValueError(
            f'{path} does not exist; expected the workdir of a run started by train.py, or pass '
            '--config=FILE'
        ) from None
    except (OSError, ValueError) as e:
        raise ValueError(f'{path} is not a readable config ({e}); pass --config=FILE') from None
    if not isinstance(values, dict) or 'model' not in values:
        raise ValueError(f'{path} is not a run config (no model section); pass --config=FILE')
    # A run recorded before a field existed ran as if it held the field's default.
    return ml_collections.ConfigDict(_lists_as_tuples(_with_defaults(values, _base_values())))


def _base_values() -> dict[str, Any]:
    from resnet_jax import config as config_lib

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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """config_flags entry point: `--config=.../resnet_jax/workdir.py:WORKDIR`."""
    if arg is None:
        raise ValueError('resnet_jax/workdir.py as a config needs the workdir: workdir.py:DIR')
    return read_config(arg)  # '' (from --workdir=) is refused there, naming the workdir


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


def check_class_names(workdir: str, class_names: tuple[str, ...], *, write: bool) -> None:
    """Records the dataset's class names, or checks them against the recorded ones: a dataset
    whose classes changed (a class folder added or renamed) would give the labels of the
    checkpoints another meaning.

    Raises:
      ValueError: naming the classes that differ.
    """
    if not class_names:
        return
    recorded = read_class_names(workdir)
    if recorded is None:
        if write:
            path = paths.join(paths.normalize(workdir), CLASS_NAMES_FILE)
            paths.write_text(path, json.dumps(list(class_names), indent=1))
        return
    if recorded != tuple(class_names):
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
    config the run in `workdir` started with (`recorded`, as `read_config` returns it)."""
    differ = [f for f in STREAM_FIELDS if _get(recorded, f) != _get(config, f)]
    if differ:
        values = ', '.join(
            f'{f}={_get(recorded, f)!r} (this config: {_get(config, f)!r})' for f in differ
        )
        flags = ' '.join(f'--config.{f}={_get(recorded, f)}' for f in differ)
        raise ValueError(
            f'the run in {workdir!r} draws its batches with {values}; resumed under other '
            f'values it would not continue its own data stream: pass {flags}, omit --config '
            "to take the workdir's own, or use another workdir"
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


# --- One writer per workdir ------------------------------------------------------------------


class WorkdirInUse(ValueError):
    """Another trainer holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class WorkdirLock:
    """`WORKDIR/lock.json`, created exclusively by the one trainer that writes the workdir.

    The file names its owner (host, pid, command, start time) and a background thread touches
    it every `heartbeat_seconds`. A second trainer is refused with one line naming the owner.
    A lock left by a crash is taken over, with a warning, when its owner's process is gone
    (same host) or it has had no heartbeat for `stale_after_seconds` (any host, e.g. a
    preempted VM). `lost` turns True if another process took the lock over meanwhile.

    Exclusive creation is `O_CREAT | O_EXCL` locally (atomic on local filesystems and NFSv3+)
    and a conditional upload on `gs://` (`ifGenerationMatch=0`: of two trainers, one creates
    the object). Taking over a stale lock on an object store is a copy and a delete, not a
    rename: docs/reliability.md says what that leaves open.
    """

    def __init__(
        self,
        workdir: str,
        *,
        heartbeat_seconds: float = 30.0,
        stale_after_seconds: float = 600.0,
    ):
        self.path = paths.join(workdir, LOCK_FILE)
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_after_seconds = stale_after_seconds
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        import sys

        return {
            'host': socket.gethostname(),
            'pid': os.getpid(),
            'token': self.token,
            'started': time.time(),
            'command': ' '.join(sys.argv)[:300],
        }

    def _create(self) -> bool:
        return paths.create_exclusive(self.path, json.dumps(self._record()))

    def _read(self) -> tuple[dict[str, Any], float] | None:
        """(owner record, seconds since its last heartbeat), or None if there is no lock."""
        try:
            age = paths.age_seconds(self.path)
            text = paths.read_text(self.path)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = {}  # being written right now, or damaged: judged by its age alone
        return record if isinstance(record, dict) else {}, age

    def _stale_reason(self, owner: dict[str, Any], age: float) -> str | None:
        pid = owner.get('pid')
        same_host = owner.get('host') == socket.gethostname()
        if same_host and isinstance(pid, int) and not _pid_alive(pid):
            return f'its process {pid} on this host is gone'
        if same_host and pid == os.getpid() and owner.get('token') not in _HELD_TOKENS:
            # A run in this very process (a notebook kernel) that ended without releasing it,
            # e.g. because the store was unreachable: no lock object of ours holds it now.
            return 'an earlier run in this process ended without releasing it'
        if age > self.stale_after_seconds:
            return f'it has had no heartbeat for {age:.0f} s'
        return None

    def _describe(self, owner: dict[str, Any], age: float) -> str:
        started = owner.get('started')
        when = (
            time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))
            if isinstance(started, (int, float))
            else 'an unknown time'
        )
        return (
            f'pid {owner.get("pid", "?")} on host {owner.get("host", "?")}, started {when}, '
            f'last heartbeat {age:.0f} s ago'
        )

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirInUse naming the trainer that holds it."""
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            found = self._read()
            if found is None:
                continue  # released between our attempt and the read: try again
            owner, age = found
            reason = self._stale_reason(owner, age)
            if reason is None:
                raise WorkdirInUse(
                    f'workdir {self.path.rsplit("/", 1)[0]!r} is in use by another trainer '
                    f'({self._describe(owner, age)}; {self.path}). Wait for it to finish or stop '
                    'it, or use another --workdir; a lock left by a crash is taken over '
                    'automatically once its process is gone or after '
                    f'{self.stale_after_seconds:.0f} s without a heartbeat'
                )
            self._take_over(owner, reason)
        raise WorkdirInUse(f'could not take {self.path}: other trainers keep taking it')

    def _take_over(self, owner: dict[str, Any], reason: str) -> None:
        # Move the stale lock aside under a unique name, then check it was the one we judged:
        # of two trainers taking over at once, only one moves it, and a fresh lock created
        # meanwhile by a third is put back.
        aside = f'{self.path}.stale-{self.token}'
        try:
            paths.move(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(paths.read_text(aside))
        except ValueError:
            moved = {}
        if moved.get('token') != owner.get('token'):
            paths.move(aside, self.path)
            return
        paths.remove(aside)
        logger.warning(
            'took over the workdir lock %s of pid %s on host %s: %s',
            self.path,
            owner.get('pid', '?'),
            owner.get('host', '?'),
            reason,
        )

    def _start_heartbeat(self) -> None:
        _HELD_TOKENS.add(self.token)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name='workdir-lock', daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            if not self._still_ours():
                self.lost = True
                logger.error('the workdir lock %s was taken over by another trainer', self.path)
                return
            try:
                paths.touch(self.path)
            except OSError as e:
                logger.warning('could not refresh the workdir lock %s: %s', self.path, e)

    def _still_ours(self) -> bool:
        found = self._read()
        return found is not None and found[0].get('token') == self.token

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still ours."""
        _HELD_TOKENS.discard(self.token)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._still_ours():
            with contextlib.suppress(FileNotFoundError):
                paths.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
