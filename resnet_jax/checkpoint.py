"""Orbax checkpoints of the train state together with the Grain data-iterator state.

One `CheckpointManager` per workdir (`workdir/checkpoints`):
* saves asynchronously every `checkpoint_every_steps`, at preemption sync points and at the end;
* keeps the last `keep` steps and the best one by validation top-1 accuracy;
* writes each step to a temporary folder and commits it with a marker file, so a step cut short
  by a crash is never taken for the latest one (leftovers are cleaned at start);
* restores the state onto whatever shardings the caller asks for, so a run saved on 8 devices
  resumes on 1, and the data iterator at exactly the next batch.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

BEST_METRIC = 'eval/top1_acc'


def create_manager(directory: str, *, save_every_steps: int, keep: int) -> ocp.CheckpointManager:
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(
            [
                policies.FixedIntervalPolicy(save_every_steps),
                policies.PreemptionCheckpointingPolicy(),
            ]
        ),
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
        os.path.abspath(directory),
        options=options,
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'data_iter': grain.checkpoint.CheckpointHandler(),
        },
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: Any,
    *,
    metrics: dict[str, float] | None = None,
    force: bool = False,
) -> bool:
    """Saves if the policy says so (or `force`); returns whether a save started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(data_iterator),
    )
    return manager.save(step, args=args, metrics=metrics, force=force)


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any
) -> Any:
    """The state at `step`, laid out as `abstract_state` says; advances `data_iterator` too.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct`s carrying the target shardings.
    """
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
    )
    return restored.state


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def restore_state_only(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """The train state at `step` without the data iterator (for evaluation)."""
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored.state


def committed_steps(directory: str) -> list[int]:
    """The steps under `directory` whose save finished (their commit marker exists), ascending.

    Reads only: unlike a CheckpointManager it never deletes the unfinished ones.
    """
    if not os.path.isdir(directory):
        return []
    return sorted(
        step
        for step in ocp.step.checkpoint_steps(directory)
        if os.path.exists(os.path.join(directory, str(step), atomicity.COMMIT_SUCCESS_FILE))
    )


def latest_step(directory: str) -> int | None:
    """The newest committed step under `directory`, or None."""
    steps = committed_steps(directory)
    return steps[-1] if steps else None
