"""Orbax checkpoints of the train state.

The state is all a run needs to continue: the data stream is a pure function of the step
(`data.train_dataset(start_batch=step)`), so no iterator state is saved, and none that would tie
a checkpoint to the number of processes.

One `CheckpointManager` per workdir (`workdir/checkpoints`):
* saves asynchronously every `checkpoint_every_steps` (the trainer forces saves at preemption
  sync points and at the end);
* keeps the last `keep` steps and the best one by validation top-1 accuracy;
* writes each step to a temporary folder and commits it with a marker file, so a step cut short
  by a crash is never taken for the latest one (leftovers are cleaned at start);
* restores the state onto whatever shardings the caller asks for, so a run saved on 8 devices
  (or 2 processes) resumes on 1;
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
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

from resnet_jax import paths

BEST_METRIC = 'eval/top1_acc'
FINGERPRINT_FILE = 'fingerprint.json'
QUARANTINE_DIR = 'bad_checkpoints'  # beside the checkpoint directory; never read back

logger = logging.getLogger('resnet_jax')


def create_manager(directory: str, *, save_every_steps: int, keep: int) -> ocp.CheckpointManager:
    """The manager of `directory` (created on the first save)."""
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
    )
    return ocp.CheckpointManager(
        paths.normalize(directory),  # a local path or a gs:// URL (Orbax reads both)
        options=options,
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler(),
        },
    )


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); earlier ones are intact."""

    def __init__(self, step: int | str, directory: str, error: BaseException):
        try:
            committed = committed_steps(directory)
            last = f'step {committed[-1]}' if committed else 'none'
        except OSError as e:  # the store itself is what failed
            last = f'unknown: the checkpoints cannot be listed now ({e})'
        remedy = (
            'check that the bucket is reachable and writable'
            if paths.is_url(directory)
            else 'free space, or point --workdir elsewhere'
        )
        super().__init__(
            f'could not save checkpoint step {step} to {directory}: {_reason(error)}; the last '
            f'complete checkpoint is {last}, and nothing was overwritten ({remedy}, and rerun '
            'to resume)'
        )


def _reason(error: BaseException) -> str:
    """The OS's words for a failed write, wherever Orbax or TensorStore wrapped them."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    for words in ('No space left on device', 'Disk quota exceeded', 'Permission denied'):
        if words.lower() in text.lower():
            return words
    return f'{type(error).__name__}: {" ".join(text.split())[:300]}'


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
) -> bool:
    """Saves if the policy says so (or `force`); returns whether a save started.

    Args:
      meta: JSON saved beside the state in the same step: what the state is of
        (`resnet_jax.workdir.identity`) and the run's host-side progress (the train metrics
        logged since the last log line), so a restore needs nothing outside the step.

    Raises:
      SaveError: for any failure to write, naming the last complete checkpoint.
    """
    directory = os.fspath(manager.directory)
    # A failed asynchronous save surfaces at the next save: name the step that failed.
    in_flight = [s for s in uncommitted_steps(directory) if s < step]
    try:
        started = manager.save(step, args=_args(state, meta), metrics=metrics, force=force)
    except Exception as e:  # Orbax wraps OS errors in ValueError and others
        raise SaveError(in_flight[0] if in_flight else step, directory, e) from e
    if started:  # Orbax finished (committed) the previous save before starting this one
        _fingerprint_in_background(directory)
    return started


def wait(manager: ocp.CheckpointManager) -> None:
    """Blocks until pending saves are committed and fingerprinted.

    Raises:
      SaveError: if a pending (asynchronous) save failed.
    """
    directory = os.fspath(manager.directory)
    try:
        manager.wait_until_finished()
    except Exception as e:
        in_flight = uncommitted_steps(directory)
        raise SaveError(in_flight[0] if in_flight else '?', directory, e) from e
    for pending in _PENDING_FINGERPRINTS:
        pending.result()
    _PENDING_FINGERPRINTS.clear()
    fingerprint_new_steps(directory)


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
    """(state at `step` laid out as `abstract_state` says, the step's meta).

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct`s carrying the target shardings.
    """
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state, dict(restored.meta)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The meta of `step` alone (cheap: no arrays are read).

    Raises:
      ValueError: if the step has none (written by an older version) or it cannot be read.
    """
    directory = os.fspath(manager.directory)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
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
            paths.write_text_atomic(target, json.dumps(record))  # whole or absent
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
