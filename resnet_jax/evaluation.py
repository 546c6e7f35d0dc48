"""Reading a run from its workdir alone, and evaluating it.

A reader needs the workdir and nothing else: a committed checkpoint, the config it was saved
under and what its network expects of its input (`preprocessing.RunInput`: classes, image shape,
the normalisation's mean and std), which every checkpoint records. No dataset is opened (but
the split being evaluated), no optimizer is built for evaluation variables, and nothing in the
workdir is written, cleaned or deleted: a reader beside a live trainer never disturbs it
(resnet_jax.checkpoint reads steps without a manager).

    run = read_run(workdir)                 # network, variables, input; from the workdir alone
    metrics = evaluate(run, 'test')         # exact metrics over a split of the run's dataset
    state = read_train_state(workdir)       # the whole TrainState, optimizer state included
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax import (
    checkpoint,
    optim,
    paths,
    pipelines,
    preprocessing,
    sharding,
    sources,
    steps,
    weights,
)
from resnet_jax import config as config_lib
from resnet_jax import workdir as workdir_lib
from resnet_jax.train_state import TrainState, create_train_state


@dataclasses.dataclass(frozen=True)
class Run:
    """A run's checkpoint as evaluation, prediction and export use it."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    model: Any
    input: preprocessing.RunInput
    variables: dict[str, Any]  # {'params', 'batch_stats'}: the moving average where kept
    averaged: bool  # whether `variables` are the run's moving average (optimizer.ema_decay)

    def state(self) -> TrainState:
        """`variables` in the shape the eval step takes (no optimizer state)."""
        return TrainState(
            step=jnp.asarray(self.step, jnp.int32),
            params=self.variables['params'],
            batch_stats=self.variables['batch_stats'],
            opt_state=None,
            rng=None,
        )

    def class_names(self) -> tuple[str, ...]:
        """What each label means, as the run was trained (the names recorded at its start)."""
        return workdir_lib.read_class_names(self.workdir) or self.input.class_names


def checkpoint_dir(workdir: str) -> str:
    directory = paths.join(paths.normalize(workdir), 'checkpoints')
    if not paths.isdir(directory):
        raise ValueError(f'no checkpoints in {directory!r}; expected a workdir written by train.py')
    return directory


def read_run(
    workdir: str, *, step: int | None = None, config: ml_collections.ConfigDict | None = None
) -> Run:
    """The run in `workdir` at `step` (default: its newest committed checkpoint), its variables
    replicated on every device.

    Args:
      config: the run's config (default: the one it recorded); the checkpoint's own record of
        what it is must match it, so a checkpoint is never read as another network.

    Raises:
      ValueError: no such checkpoint, a damaged one, one of another network than `config`, or
        weights that are not finite; naming the step and the workdir.
    """
    return _read(workdir, step, config, whole_state=False)[1]


def read_train_state(
    workdir: str, *, step: int | None = None, config: ml_collections.ConfigDict | None = None
) -> tuple[TrainState, Run]:
    """The whole train state at `step` (optimizer state and RNG too), replicated, without the
    run's dataset: its structure follows from the config and the recorded input; and the run
    as `read_run` gives it."""
    return _read(workdir, step, config, whole_state=True)


def _read(
    workdir: str, step: int | None, config: Any, *, whole_state: bool
) -> tuple[TrainState | None, Run]:
    config = config if config is not None else workdir_lib.read_config(workdir)
    directory = checkpoint_dir(workdir)
    # A live trainer deletes old steps as it saves new ones: the newest is looked up again if
    # the one being read goes under the reader.
    for _ in range(3):
        chosen = _committed_step(directory, step)
        try:
            return _read_step(workdir, directory, chosen, config, whole_state)
        except Exception:
            if chosen in checkpoint.committed_steps(directory):
                raise  # still there: the error is the checkpoint's own
            if step is not None:
                raise ValueError(
                    f'checkpoint step {step} in {directory!r} was deleted while it was read (a '
                    f'trainer running in {workdir!r} keeps only its last checkpoints); pass '
                    'the --step of a kept one'
                ) from None
    raise ValueError(f'the checkpoints in {directory!r} kept changing while they were read')


def _read_step(
    workdir: str, directory: str, step: int, config: Any, whole_state: bool
) -> tuple[TrainState | None, Run]:
    """The step verified and checked against `config`, then read once: the whole state, or the
    evaluation variables alone."""
    problem = checkpoint.verify(directory, step)
    if problem is not None:
        raise ValueError(f'checkpoint step {step} in {directory!r} is damaged: {problem}')
    meta = checkpoint.read_meta_of(directory, step)
    run_input = _recorded_input(meta, config, step)
    model = config_lib.create_model_from_config(config, run_input.num_classes)
    where = f'checkpoint step {step} in {directory!r}'
    workdir_lib.check_identity(meta['identity'], workdir_lib.identity(config, model), where)
    state = None
    if whole_state:
        state = _read_whole_state(directory, step, config, model, run_input)
        variables, averaged = state.eval_variables(), state.ema is not None
    else:
        variables, averaged = _read_eval_variables(directory, step)
    weights.check_finite(variables, where)
    run = Run(paths.normalize(workdir), step, config, model, run_input, variables, averaged)
    return state, run


def _read_whole_state(
    directory: str, step: int, config: Any, model: Any, run_input: preprocessing.RunInput
) -> TrainState:
    shape = run_input.network_shape()
    abstract_params = jax.eval_shape(
        lambda: create_train_state(model, optax.identity(), config.seed, shape).params
    )
    # The schedule is no part of the state: any steps_per_epoch gives the same structure.
    tx, _ = optim.create_optimizer(
        config.optimizer, abstract_params, total_steps=config.total_steps, steps_per_epoch=1
    )
    init = lambda: create_train_state(
        model, tx, config.seed, shape, ema=bool(config.optimizer.ema_decay)
    )
    abstract = jax.eval_shape(init)
    replicated = NamedSharding(sharding.data_mesh(), PartitionSpec())
    target = checkpoint.abstract_with_shardings(
        abstract, jax.tree.map(lambda _: replicated, abstract)
    )
    return checkpoint.read_state(directory, step, target)[0]


def _committed_step(directory: str, step: int | None) -> int:
    """`step`, or the newest committed step; ValueError unless it is committed."""
    available = checkpoint.committed_steps(directory)
    chosen = (available[-1] if available else None) if step is None else step
    if chosen is None or chosen not in available:
        raise ValueError(f'checkpoint step {chosen} not in {directory!r}; available: {available}')
    return chosen


def _recorded_input(
    meta: dict[str, Any], config: ml_collections.ConfigDict, step: int
) -> preprocessing.RunInput:
    """What the network expects of its input: recorded in the checkpoint, or (a checkpoint
    written before they recorded it) derived from the run's dataset, which must be present."""
    if 'input' in meta:
        return preprocessing.RunInput.from_json(meta['input'])
    ds = config.dataset
    try:
        _, info = sources.open_split(ds.name, ds.train_split, ds.data_dir)
        preprocess = preprocessing.preprocess_of(ds, info, train=False)
    except ValueError as e:
        raise ValueError(
            f'checkpoint step {step} was written before checkpoints recorded their input '
            f'normalisation, so reading it needs its dataset, and: {e}'
        ) from None
    return preprocessing.RunInput.of(preprocess, ds.image_size)


def _read_eval_variables(directory: str, step: int) -> tuple[dict[str, Any], bool]:
    """The variables evaluation uses (the moving average where the run kept one), read alone
    from the step's files: no optimizer state, so no optimizer to build."""
    tree = checkpoint.state_metadata(directory, step)
    averaged = tree.get('ema') is not None
    wanted = tree['ema'] if averaged else {k: tree[k] for k in ('params', 'batch_stats')}
    replicated = NamedSharding(sharding.data_mesh(), PartitionSpec())
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
        {'ema': wanted} if averaged else wanted,
        is_leaf=lambda x: isinstance(x, ocp.metadata.ArrayMetadata),
    )
    restored = checkpoint.read_partial_state(directory, step, target)
    variables = restored['ema'] if averaged else restored
    return {'params': variables['params'], 'batch_stats': variables['batch_stats']}, averaged


# --- Metrics of a split -------------------------------------------------------------------


def evaluate_split(
    eval_step: Any,
    state: TrainState,
    source: Any,
    preprocess: preprocessing.Preprocess,
    *,
    config: ml_collections.ConfigDict,
    prefix: str,
) -> dict[str, float]:
    """Exact metrics over a whole split: masked sums divided by the real example count.

    The batch size (`eval_batch_size`, rounded up to a multiple of the devices:
    `sharding.eval_batch_size`), workers and read threads are the config's, for the trainer's
    evaluations and `evaluate` alike; batches are sharded over the one mesh.
    """
    mesh = sharding.data_mesh()
    sums = None
    for local in pipelines.eval_dataset(
        source,
        preprocess,
        batch_size=sharding.local_eval_batch_size(config.eval_batch_size, mesh),
        reading=pipelines.Reading.of(config.dataset),
    ):
        out = eval_step(state, sharding.global_batch(local, mesh))
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    sums = jax.device_get(sums)
    n = float(sums['num_examples'])
    return {
        f'{prefix}/loss': float(sums['loss']) / n,
        f'{prefix}/top1_acc': float(sums['top1_correct']) / n,
        f'{prefix}/top5_acc': float(sums['top5_correct']) / n,
        f'{prefix}/num_examples': n,
    }


def evaluate(run: Run, split: str) -> dict[str, float]:
    """Exact metrics of `run` over `split` of its dataset (the only data it reads), prepared
    as the run's own evaluations prepared them."""
    ds = run.config.dataset
    source, _ = sources.open_split(ds.name, split, ds.data_dir)
    preprocess = run.input.eval_preprocess()
    mesh = sharding.data_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    eval_step = jax.jit(
        steps.make_eval_step(run.model, preprocess.normalize), out_shardings=replicated
    )
    return evaluate_split(
        eval_step, run.state(), source, preprocess, config=run.config, prefix=split
    )


def variables_on_host(run: Run) -> dict[str, Any]:
    """`run.variables` as numpy arrays (for export and conversion)."""
    return jax.tree.map(np.asarray, jax.device_get(run.variables))
