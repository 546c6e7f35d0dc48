"""Orbax checkpoints of the train state.

The state is all a run needs to continue: the data stream is a pure function of the step
(`pipelines.train_batches(first_step=step)`), so no iterator state is saved, and none that
would tie a checkpoint to the number of processes.

One `CheckpointManager` per workdir (`workdir/checkpoints`):
* saves asynchronously every `checkpoint_every_steps` (the trainer forces saves at preemption
  sync points and at the end);
* keeps the last `keep` steps and the best one by validation top-1 accuracy;
* writes each step to a temporary folder and commits it with a marker file, so a step cut short
  by a crash is never taken for the latest one (leftovers are cleaned at start);
* restores the state onto whatever shardings the caller asks for, so a run saved on 8 devices
  (or 2 processes) resumes on 1;
* readers (evaluate, predict, analysis, init_from) open steps with `read_state` / `read_meta_of`,
  which never write, clean or delete anything: a reader beside a live trainer never touches the
  step it is saving;
* every call that waits on the store is bounded (`bounded`): a store that does not answer stops
  the run with one line after `storage_timeout_seconds`, or at once on a stop signal;
* saves beside the state a small JSON item, `meta`: what the state is of (the network, input
  normalisation and optimizer, `resnet_jax.workdir.identity`), checked by every reader before
  the arrays are restored, and the host-side progress of the run;
* stores a content fingerprint (SHA-256 of every file) beside each committed step, so a step
  that was silently corrupted afterwards is recognised, set aside and never restored.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

from resnet_jax import paths, signals

BEST_METRIC = 'eval/top1_acc'
FINGERPRINT_FILE = 'fingerprint.json'
QUARANTINE_DIR = 'bad_checkpoints'  # beside the checkpoint directory; never read back

logger = logging.getLogger('resnet_jax')


def create_manager(directory: str, *, save_every_steps: int, keep: int) -> ocp.CheckpointManager:
    """The trainer's manager of `directory`, which is created by the first save (a run refused
    before it saves leaves no folder behind). Only the workdir's one writer, which holds its
    lock, may have one: it cleans up unfinished steps, which are a live trainer's saves."""
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Preemption saves are forced by the trainer, which owns the preemption check.
        save_decision_policy=policies.FixedIntervalPolicy(save_every_steps),
        preservation_policy=policies.AnyPreservationPolicy(
            [
                policies.LatestN(keep),
                policies.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        ),
        temporary_path_class=atomicity.CommitFileTemporaryPath,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
        create=False,
    )
    return ocp.CheckpointManager(
        paths.normalize(directory),  # a local path or a gs:// URL (Orbax reads both)
        options=options,
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler(),
        },
    )


DEFAULT_STORAGE_TIMEOUT = 300.0  # seconds; the config's storage_timeout_seconds

T = TypeVar('T')


class StorageStalled(OSError):
    """The store did not answer a call in time, or a stop signal came while waiting for it.

    The call is abandoned but still runs in a thread nobody can cancel (TensorStore's, gcsfs'),
    so the process must end without waiting for it: `hard_exit`.
    """

    hard_exit = True

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def bounded(fn: Callable[[], T], *, seconds: float, what: str) -> T:
    """`fn()`, waited for at most `seconds` on a thread of its own.

    The calling thread polls, so the signal handlers of the main thread run meanwhile: a stop
    signal (`resnet_jax.signals`) ends the wait at once, whichever handler took it.

    Raises:
      StorageStalled: after `seconds`, or when a stop signal arrives meanwhile.
      whatever `fn` raised.
    """
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome['value'] = fn()
        except BaseException as e:  # handed to the caller
            outcome['error'] = e

    seen = signals.received()
    deadline = time.monotonic() + seconds
    thread = threading.Thread(target=call, name=f'storage: {what}'[:60], daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
            if signals.received() > seen:
                signum = signals.last_received()
                raise StorageStalled(
                    f'stopped by {signals.name(signum)} while {what}, which the store had not '
                    f'finished after {seconds - (deadline - time.monotonic()):.0f} s',
                    128 + signum,
                )
            if thread.is_alive() and time.monotonic() > deadline:
                raise StorageStalled(
                    f'{what}: the store did not answer within {seconds:g} s '
                    '(storage_timeout_seconds)'
                )
    except signals.Interrupted as e:  # a handler that raises: the call is still running
        e.hard_exit = True
        raise
    if 'error' in outcome:
        raise outcome['error']
    return outcome['value']


# Managers whose store stalled once: every later call on them is given up on at once (closing a
# run after a stall must not wait for the same store again, once per closer).
_STALLED: weakref.WeakSet = weakref.WeakSet()


def _on_manager(
    manager: ocp.CheckpointManager, fn: Callable[[], T], seconds: float, what: str
) -> T:
    """`bounded(fn)` for a call on `manager`'s store."""
    if manager in _STALLED:
        raise StorageStalled(f'{what}: given up, the store stalled earlier in this run')
    try:
        return bounded(fn, seconds=seconds, what=what)
    except (StorageStalled, signals.Interrupted):
        _STALLED.add(manager)
        raise


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); earlier ones are intact."""

    def __init__(self, step: int | str, directory: str, error: BaseException):
        try:
            committed = committed_steps(directory)
            last = (
                f'the last complete checkpoint is step {committed[-1]}'
                if committed
                else 'no checkpoint is complete yet'
            )
        except OSError as e:  # the store itself is what failed
            last = f'the checkpoints cannot be listed now ({e})'
        if isinstance(error, StorageStalled):
            remedy = (
                'check that the bucket is reachable and that its credentials work for '
                'TensorStore (GOOGLE_APPLICATION_CREDENTIALS, or gcloud auth application-default '
                'login)'
            )
        elif paths.is_url(directory):
            remedy = 'check that the bucket is reachable and writable'
        else:
            remedy = 'free space, or point --workdir elsewhere'
        super().__init__(
            f'could not save checkpoint step {step} to {directory}: {_reason(error)}; {last}, '
            f'and nothing was overwritten ({remedy}, and rerun to resume)'
        )
        # A save that stalled is still running in a thread: the process must not wait for it.
        self.hard_exit = getattr(error, 'hard_exit', False)
        self.exit_code = getattr(error, 'exit_code', 1)


def _reason(error: BaseException) -> str:
    """The OS's words for a failed write, wherever Orbax or TensorStore wrapped them."""
    if isinstance(error, StorageStalled):
        return str(error)
    seen, visited = error, set()
    # The chain can loop: Orbax raises the same failure again when waited for while an error
    # naming it is being handled.
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    for words in ('No space left on device', 'Disk quota exceeded', 'Permission denied'):
        if words.lower() in text.lower():
            return words
    return paths.describe(error)


def _args(state: Any, meta: dict[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    *,
    meta: dict[str, Any],
    metrics: dict[str, float] | None = None,
    force: bool = False,
    timeout: float = DEFAULT_STORAGE_TIMEOUT,
) -> bool:
    """Saves if the policy says so (or `force`); returns whether a save started.

    Args:
      meta: JSON saved beside the state in the same step: what the state is of
        (`resnet_jax.workdir.identity`) and the run's host-side progress (the train metrics
        logged since the last log line), so a restore needs nothing outside the step.

    Raises:
      SaveError: for any failure to write, naming the last complete checkpoint; also when the
        store stalls for `timeout` seconds (a save waits for the one before it).
    """
    directory = os.fspath(manager.directory)
    # A failed asynchronous save surfaces at the next save: name the step that failed.
    in_flight = [s for s in uncommitted_steps(directory) if s < step]
    try:
        started = _on_manager(
            manager,
            lambda: manager.save(step, args=_args(state, meta), metrics=metrics, force=force),
            timeout,
            f'saving checkpoint step {step}',
        )
    except Exception as e:  # Orbax wraps OS errors in ValueError and others
        raise SaveError(in_flight[0] if in_flight else step, directory, e) from e
    if started:  # Orbax finished (committed) the previous save before starting this one
        _fingerprint_in_background(directory)
    return started


def wait(manager: ocp.CheckpointManager, timeout: float = DEFAULT_STORAGE_TIMEOUT) -> None:
    """Blocks until pending saves are committed and fingerprinted.

    Raises:
      SaveError: if a pending (asynchronous) save failed, or did not finish within `timeout`.
    """
    directory = os.fspath(manager.directory)
    try:
        _on_manager(
            manager, manager.wait_until_finished, timeout, 'waiting for a checkpoint to commit'
        )
    except Exception as e:
        in_flight = uncommitted_steps(directory)
        raise SaveError(in_flight[0] if in_flight else '?', directory, e) from e
    for pending in _PENDING_FINGERPRINTS:
        pending.result()
    _PENDING_FINGERPRINTS.clear()
    fingerprint_new_steps(directory)


def close(manager: ocp.CheckpointManager, timeout: float = DEFAULT_STORAGE_TIMEOUT) -> None:
    """Closes the manager; a store that stalls is given up on after `timeout` (StorageStalled)."""
    _on_manager(manager, manager.close, timeout, 'closing the checkpoint manager')


def _restore_args(abstract_state: Any) -> ocp.args.Composite:
    return ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
    )


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    timeout: float = DEFAULT_STORAGE_TIMEOUT,
) -> tuple[Any, dict[str, Any]]:
    """(state at `step` laid out as `abstract_state` says, the step's meta).

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct`s carrying the target shardings.
    """
    restored = _on_manager(
        manager,
        lambda: manager.restore(step, args=_restore_args(abstract_state)),
        timeout,
        f'restoring checkpoint step {step}',
    )
    return restored.state, dict(restored.meta)


# --- Readers: never write, clean or delete ----------------------------------------------------


def _reader() -> ocp.Checkpointer:
    """A checkpointer for reading one step folder: unlike a CheckpointManager it has no
    cleanup of unfinished steps (a live trainer's save in progress) and writes nothing."""
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()
        )
    )


def read_state(
    directory: str, step: int, abstract_state: Any, timeout: float = DEFAULT_STORAGE_TIMEOUT
) -> tuple[Any, dict[str, Any]]:
    """`restore` for readers: (state, meta) of committed `step`, read without a manager."""
    step_dir = paths.join(paths.normalize(directory), str(step))
    with _reader() as reader:
        restored = bounded(
            lambda: reader.restore(step_dir, args=_restore_args(abstract_state)),
            seconds=timeout,
            what=f'reading checkpoint step {step}',
        )
    return restored.state, dict(restored.meta)


def state_metadata(directory: str, step: int) -> dict[str, Any]:
    """The tree of the state saved at `step`: each array's shape and dtype (ArrayMetadata),
    None where the state held None; read from the step's metadata, no array is read."""
    step_dir = paths.join(paths.normalize(directory), str(step))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(state=ocp.PyTreeCheckpointHandler())) as c:
        return dict(c.metadata(step_dir).item_metadata['state'].tree)


def read_partial_state(
    directory: str, step: int, target: Any, timeout: float = DEFAULT_STORAGE_TIMEOUT
) -> Any:
    """The subtrees of the state at `step` that `target` names (ShapeDtypeStructs with their
    shardings), read alone: a reader of the weights needs no optimizer to describe the rest."""
    step_dir = paths.join(paths.normalize(directory), str(step))
    restore_args = jax.tree.map(
        lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
        target,
    )
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    )
    handler = ocp.CompositeCheckpointHandler(state=ocp.PyTreeCheckpointHandler())
    with ocp.Checkpointer(handler) as reader:
        restored = bounded(
            lambda: reader.restore(step_dir, args=args),
            seconds=timeout,
            what=f'reading checkpoint step {step}',
        )
    return restored.state


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The meta of `step` alone (cheap: no arrays are read); see `read_meta_of`."""
    return read_meta_of(os.fspath(manager.directory), step)


def read_meta_of(directory: str, step: int) -> dict[str, Any]:
    """The meta of `step` in `directory` alone (cheap: no arrays are read), read only.

    Raises:
      ValueError: if the step has none (written by an older version) or it cannot be read.
    """
    directory = paths.normalize(directory)
    try:
        with _reader() as reader:
            restored = reader.restore(
                paths.join(directory, str(step)),
                args=ocp.args.Composite(meta=ocp.args.JsonRestore()),
            )
        meta = restored.meta
    except Exception as e:
        raise ValueError(
            f'checkpoint step {step} in {directory!r} has no readable record of what it is '
            f'({type(e).__name__}); expected a checkpoint written by this version of train.py'
        ) from None
    if not isinstance(meta, dict) or 'identity' not in meta:
        raise ValueError(
            f'checkpoint step {step} in {directory!r} does not record what it is; expected a '
            'checkpoint written by this version of train.py'
        )
    return dict(meta)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def committed_steps(directory: str) -> list[int]:
    """The steps under `directory` whose save finished (their commit marker exists), ascending.

    Reads only: unlike a CheckpointManager it never deletes the unfinished ones.
    """
    if not paths.isdir(directory):
        return []
    return sorted(
        step
        for step in ocp.step.checkpoint_steps(directory)
        if paths.exists(paths.join(directory, str(step), atomicity.COMMIT_SUCCESS_FILE))
    )


def uncommitted_steps(directory: str) -> list[int]:
    """Steps under `directory` being written, or whose save failed or was cut off, ascending."""
    if not paths.isdir(directory):
        return []
    done = set(committed_steps(directory))
    return sorted(s for s in ocp.step.checkpoint_steps(directory) if s not in done)


def latest_step(directory: str) -> int | None:
    """The newest committed step under `directory`, or None."""
    steps = committed_steps(directory)
    return steps[-1] if steps else None


# --- Content fingerprints -------------------------------------------------------------------


def content_digest(step_dir: str) -> str:
    """SHA-256 over every file of a step (relative path and bytes), the fingerprint excluded."""
    digest = hashlib.sha256()
    for relative in paths.files_under(step_dir):
        if relative == FINGERPRINT_FILE:
            continue
        digest.update(relative.encode() + b'\0')
        with paths.open_file(paths.join(step_dir, relative), 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                digest.update(chunk)
        digest.update(b'\0')
    return digest.hexdigest()


# Hashing a step reads every byte of it (about 100 MB for a ResNet-50 with its momentum): done
# on a thread of its own so the training thread never waits for it; `wait` joins it.
_FINGERPRINTER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='fingerprint')
_PENDING_FINGERPRINTS: list[concurrent.futures.Future] = []


def _fingerprint_in_background(directory: str) -> None:
    if jax.process_index() != 0:
        return
    _PENDING_FINGERPRINTS.append(_FINGERPRINTER.submit(fingerprint_new_steps, directory))


def fingerprint_new_steps(directory: str) -> None:
    """Writes the fingerprint of each committed step that has none (process 0 only)."""
    if jax.process_index() != 0:
        return
    for step in committed_steps(directory):
        step_dir = paths.join(directory, str(step))
        target = paths.join(step_dir, FINGERPRINT_FILE)
        if paths.exists(target):
            continue
        try:
            record = {'sha256': content_digest(step_dir), 'step': step, 'time': time.time()}
            paths.write_text(target, json.dumps(record))  # whole or absent
        except OSError as e:  # e.g. the step was just deleted by the preservation policy
            logger.warning('could not fingerprint checkpoint step %d: %s', step, e)


def verify(directory: str, step: int) -> str | None:
    """None if step's files match its fingerprint (or it has none yet), else what is wrong."""
    step_dir = paths.join(directory, str(step))
    path = paths.join(step_dir, FINGERPRINT_FILE)
    if not paths.exists(path):
        return None
    try:
        expected = json.loads(paths.read_text(path))['sha256']
    except (OSError, ValueError, KeyError) as e:
        return f'its fingerprint file is unreadable ({e})'
    if content_digest(step_dir) != expected:
        return 'its files do not match the fingerprint written when it was saved'
    return None


def has_fingerprint(directory: str, step: int) -> bool:
    return paths.exists(paths.join(directory, str(step), FINGERPRINT_FILE))


def quarantine(directory: str, step: int) -> str:
    """Moves a bad step out of the manager's sight (never deletes it); returns where to."""
    directory = paths.normalize(directory)
    target_root = paths.join(directory.rsplit('/', 1)[0], QUARANTINE_DIR)
    if not paths.is_url(target_root):
        os.makedirs(target_root, exist_ok=True)  # object stores have no folders to make
    target = paths.join(target_root, f'{step}-{int(time.time())}')
    paths.move(paths.join(directory, str(step)), target)
    return target
