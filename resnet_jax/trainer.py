"""train_and_evaluate(config, workdir): build, loop, finish.

1. Build (`build_run`): validate the config and open the data before the workdir is touched;
   then the workdir's lock, the model, optimizer and shardings, the newest good checkpoint (or
   a state initialised directly on the devices), the jitted steps, the metric writer.
2. Loop: one jitted train step per global batch, then each periodic action in turn
   (resnet_jax.actions: preemption, non-finite check, log, eval, the caller's own, checkpoint,
   progress) until the last step or an action stops it.
3. Finish: the final eval on the validation and test splits, pending saves waited for, one
   summary line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax import (
    accelerators,
    actions,
    checkpoint,
    compilation_cache,
    evaluation,
    metrics,
    optim,
    paths,
    pipelines,
    preprocessing,
    pretrained,
    sharding,
    signals,
    sources,
    steps,
    weights,
)
from resnet_jax import config as config_lib
from resnet_jax import workdir as workdir_lib
from resnet_jax.lock import WorkdirInUse, WorkdirLock
from resnet_jax.train_state import TrainState, create_train_state

logger = logging.getLogger('resnet_jax')


@dataclasses.dataclass(frozen=True)
class _Resume:
    """What a checkpoint must agree with to be resumed (checked before its arrays are read)."""

    config: ml_collections.ConfigDict
    identity: dict[str, Any]
    recorded: ml_collections.ConfigDict | None  # the workdir's config.json, where readable
    steps_per_epoch: int
    workdir: str

    def check(self, meta: dict[str, Any], step: int, where: str) -> None:
        """Refuses a step of another network or optimizer, or one whose run resumed under this
        config would draw another data stream or jump its learning rate."""
        workdir_lib.check_identity(meta['identity'], self.identity, where)
        # The config the step was saved under; config.json for steps from before it was kept.
        saved = meta.get('config')
        recorded = workdir_lib.config_from_values(saved) if saved else self.recorded
        if recorded is None:
            logger.warning(
                '%s records no config and config.json is unreadable: its data '
                'stream and schedule are not checked',
                where,
            )
            return
        workdir_lib.check_stream(recorded, self.config, self.workdir)
        workdir_lib.check_schedule(recorded, self.config, step, self.steps_per_epoch, self.workdir)


def _restore_latest_good(
    manager: Any, abstract_state: Any, resume: _Resume, timeout: float
) -> tuple[TrainState | None, dict[str, Any]]:
    """The newest checkpoint that verifies and restores; bad ones are set aside, never reused.

    Returns:
      (state or None if there is no checkpoint, the step's meta).
    Raises:
      ValueError: checkpoints exist but none is usable, or the newest one is of another network
        or optimizer, or would resume another run (a mistake in the config, not corruption:
        nothing is set aside).
    """
    directory = os.fspath(manager.directory)
    set_aside = []
    for step in sorted(manager.all_steps(), reverse=True):
        problem = _verify_once(directory, step)
        if problem is None:
            try:
                meta = checkpoint.read_meta(manager, step)
            except ValueError as e:
                problem = str(e)
            else:
                resume.check(meta, step, f'checkpoint step {step} in {directory!r}')
                try:
                    state, meta = checkpoint.restore(manager, step, abstract_state, timeout)
                except checkpoint.StorageStalled:
                    raise  # the store, not the checkpoint
                except Exception as e:  # Orbax raises many kinds for bad files
                    problem = f'it cannot be read ({type(e).__name__}: {str(e)[:200]})'
                else:
                    problem = _nonfinite(state, f'checkpoint step {step}')
                    if problem is None:
                        return state, meta
        moved = checkpoint.quarantine(directory, step) if jax.process_index() == 0 else '?'
        set_aside.append(f'checkpoint step {step} is bad: {problem}; moved to {moved}')
        logger.warning('%s; falling back to the previous checkpoint', set_aside[-1])
        manager.reload()
    if set_aside:
        raise ValueError(f'no usable checkpoint in {directory!r}: ' + '; '.join(set_aside))
    return None, {}


def _nonfinite(state: TrainState, where: str) -> str | None:
    """None if every array of `state` is finite, else which one is not."""
    try:
        weights.check_finite(flax.serialization.to_state_dict(state), where)
    except ValueError as e:
        return str(e)
    return None


def _verify_once(directory: str, step: int) -> str | None:
    """Process 0 checks the step's fingerprint and tells the others: the files are read once,
    not by every host of a pod."""
    problem = checkpoint.verify(directory, step) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        bad = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
        if bad and problem is None:
            problem = 'process 0 found its files do not match the fingerprint written at save'
    return problem


def build_training(
    config: ml_collections.ConfigDict, info: sources.DatasetInfo, num_train_examples: int
) -> tuple[Any, optax.GradientTransformation, optax.Schedule, Any]:
    """The model, optimizer, schedule and the state's init function of a config."""
    steps_per_epoch = max(1, num_train_examples // config.batch_size)
    image_shape = preprocessing.input_shape(info, config.dataset.image_size)
    model = config_lib.create_model_from_config(config, info.num_classes)
    abstract_params = jax.eval_shape(
        lambda: create_train_state(model, optax.identity(), config.seed, image_shape).params
    )
    tx, schedule = optim.create_optimizer(
        config.optimizer,
        abstract_params,
        total_steps=config.total_steps,
        steps_per_epoch=steps_per_epoch,
    )
    init = functools.partial(
        create_train_state,
        model,
        tx,
        config.seed,
        image_shape,
        ema=bool(config.optimizer.ema_decay),
    )
    return model, tx, schedule, init


def _lock_workdir(workdir: str, closers: list, storage_timeout: float) -> WorkdirLock:
    """Process 0 takes the workdir's lock; every process learns whether it got it. Its release
    is a closer from before it is taken: a signal right after cannot leave it behind."""
    lock = WorkdirLock(workdir, failure_limit_seconds=storage_timeout)
    closers.append(lock.release)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirInUse as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        held = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not held and error is None:
            error = WorkdirInUse(
                f'workdir {workdir!r} is in use by another trainer (see process 0)'
            )
    if error is not None:
        raise error
    return lock


@dataclasses.dataclass
class Run:
    """What `build_run` made: the pieces the loop and the final phase use."""

    ctx: actions.Context
    state: TrainState
    first_step: int
    meta: dict[str, Any]  # of the restored checkpoint ({} on a fresh start)
    train_step: StepCaller
    batches: Any  # iterator of the global train batches, on the devices (resnet_jax.prefetch)
    mesh: Any
    has_test: bool
    closers: list[Any]  # called in reverse order when the run ends


def _open_data(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], sources.DatasetInfo]:
    """The sources of the train/eval/test splits and the dataset's info; ValueError if bad."""
    ds = config.dataset
    train, info = sources.open_split(ds.name, ds.train_split, ds.data_dir, download=ds.download)
    splits = {'train': train, 'eval': sources.open_split(ds.name, ds.eval_split, ds.data_dir)[0]}
    if ds.test_split:
        splits['test'] = sources.open_split(ds.name, ds.test_split, ds.data_dir)[0]
    if len(train) < config.batch_size:
        raise ValueError(
            f'batch_size {config.batch_size} exceeds the {len(train)} examples of '
            f'{ds.train_split!r}'
        )
    return splits, info


def _initial_state(config, model, manager, init, state_shardings, resume):
    """The newest good checkpoint's state and meta, or a new state made on the devices."""
    target = checkpoint.abstract_with_shardings(jax.eval_shape(init), state_shardings)
    state, meta = _restore_latest_good(manager, target, resume, config.storage_timeout_seconds)
    if state is None:
        state = jax.jit(init, out_shardings=state_shardings)()
        if config.get('init_from'):  # absent from the config.json of older runs
            state = _start_from_weights(config.init_from, model, state, state_shardings)
        return state, {}
    logger.info('resumed from %s at step %d', manager.directory, int(jax.device_get(state.step)))
    return state, meta


def _start_from_weights(
    path: str, model: Any, state: TrainState, state_shardings: Any
) -> TrainState:
    """`state` with the model's variables (and their moving average) loaded from `path`."""
    fresh = jax.device_get(state.variables())
    loaded = pretrained.load_variables(path, model, fresh)
    state = state.replace(params=loaded['params'], batch_stats=loaded['batch_stats'])
    if state.ema is not None:
        state = state.replace(ema=loaded)
    logger.info('initialised from %s', path)
    return jax.device_put(state, state_shardings)


def _compile_steps(config, model, tx, schedule, mesh, state_shardings, normalize):
    """The jitted train and eval steps with their shardings (the train state donated); both
    normalise the uint8 batches on the devices with `normalize`."""
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    train_step = jax.jit(
        steps.make_train_step(
            model, tx, schedule, steps.StepOptions.of(config), normalize=normalize
        ),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        steps.make_eval_step(model, normalize),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=replicated,
    )
    return StepCaller(train_step, config.steps_per_call, mesh, state_shardings), eval_step


class StepCaller:
    """Advances the loop by one train step, or by `steps_per_call` steps in one jitted call
    (`steps.make_multi_step`) where a whole group fits before the last step and starts on a
    multiple of it (a run resumed off the grid, or a remainder, takes single steps)."""

    def __init__(self, train_step: Any, steps_per_call: int, mesh: Any, state_shardings: Any):
        self.single = train_step
        self.k = k = steps_per_call
        if k == 1:
            return
        stacked = NamedSharding(mesh, PartitionSpec(None, sharding.DATA_AXIS))
        replicated = NamedSharding(mesh, PartitionSpec())
        self.multi = jax.jit(
            steps.make_multi_step(train_step),
            in_shardings=(state_shardings, stacked),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
        self.stack = jax.jit(
            lambda batches: jax.tree.map(lambda *x: jnp.stack(x), *batches),
            out_shardings=stacked,
        )
        self.unstack = jax.jit(lambda m: [jax.tree.map(lambda x, i=i: x[i], m) for i in range(k)])

    def __call__(self, loop: actions.Loop, batches: Any) -> None:
        if self.k > 1 and loop.step % self.k == 0 and loop.step + self.k <= loop.total_steps:
            group = self.stack([next(batches) for _ in range(self.k)])
            loop.state, stacked = self.multi(loop.state, group)
            for step_metrics in self.unstack(stacked):
                loop.record_step(step_metrics)
            loop.advanced = self.k
        else:
            loop.state, step_metrics = self.single(loop.state, next(batches))
            loop.record_step(step_metrics)
            loop.advanced = 1


def build_run(
    config: ml_collections.ConfigDict, workdir: str, closers: list, *, start_over: bool = False
) -> Run:
    """Everything a run needs; registers what must be closed (the lock, the checkpoint manager,
    the writer, the data workers) in `closers`.

    Checks first, writes last: every check that can refuse the start (the config, the data,
    the workdir's record and checkpoints, `init_from`, the first batch) runs before anything in
    the workdir is written, so a refused start leaves a workdir as it was (a new one empty).
    The run's record (config.json, class_names.json, metrics.jsonl, TensorBoard) is written
    once the state is ready and the first batch has been read.
    """
    # Before anything asks JAX for its devices: JAX_PLATFORMS=cuda with a broken plugin fails
    # there with JAX's own message, this names the plugin and driver problem.
    accelerators.check_start(config.require_backend)
    config_lib.validate(config, jax.device_count(), jax.process_count())
    paths.check_supported(workdir, 'workdir')
    if config.init_from and not checkpoint.committed_steps(
        paths.join(paths.normalize(workdir), 'checkpoints')
    ):
        pretrained.check_path(config.init_from)  # a resumed run never reads it
    cache = compilation_cache.location(config.compilation_cache_dir, workdir, jax.process_count())
    if not cache.in_workdir:
        compilation_cache.enable(cache.path)
    splits, info = _open_data(config)
    mesh = sharding.data_mesh()
    model, tx, schedule, init = build_training(config, info, len(splits['train']))
    identity = workdir_lib.identity(config, model)
    if not paths.exists(paths.normalize(workdir)):  # a start refused from here on removes it
        closers.append(functools.partial(paths.remove_empty_dir, paths.normalize(workdir)))
    workdir = paths.writable_dir(workdir, 'workdir')
    lock = _lock_workdir(workdir, closers, config.storage_timeout_seconds)
    checkpoint_dir = paths.join(workdir, 'checkpoints')
    start = workdir_lib.check_start(
        workdir,
        config,
        identity,
        info.class_names,
        steps=checkpoint.committed_steps(checkpoint_dir),
        start_over=start_over,
    )

    state_shardings = sharding.state_shardings(
        jax.eval_shape(init), mesh, fsdp=config.fsdp, fsdp_min_size=config.fsdp_min_size
    )
    manager = checkpoint.create_manager(
        checkpoint_dir, save_every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints
    )
    closers.append(lambda: _close_manager(manager, config.storage_timeout_seconds))
    steps_per_epoch = max(1, len(splits['train']) // config.batch_size)
    resume = _Resume(config, identity, start.recorded, steps_per_epoch, workdir)
    state, meta = _initial_state(config, model, manager, init, state_shardings, resume)
    first_step = int(jax.device_get(state.step))

    ds = config.dataset
    preprocess = {
        train: preprocessing.preprocess_of(ds, info, train=train) for train in (True, False)
    }
    batches = pipelines.train_batches(
        config, splits['train'], info, preprocess[True], mesh, first_step
    )
    closers.append(batches.close)
    batches = _FirstBatchRead(batches)  # a damaged first image refuses the start here
    # Train and eval share the normalisation (only their host augmentation differs).
    normalize = preprocess[False].normalize
    train_step, eval_step = _compile_steps(
        config, model, tx, schedule, mesh, state_shardings, normalize
    )

    # The run has started: its record is written from here on.
    workdir_lib.record_start(start, config, info.class_names)
    if cache.in_workdir:  # only now: a refused start leaves the workdir as it was
        compilation_cache.enable(cache.path)
    writer = metrics.MetricWriter(workdir, resume_step=first_step)
    closers.append(writer.close)

    def evaluate(state: TrainState, split: str) -> dict[str, float]:
        return evaluation.evaluate_split(
            eval_step,
            state,
            splits[split],
            preprocess[False],
            config=config,
            prefix=split,
        )

    # What every checkpoint records beside the state, so that it reads without the rest of
    # the workdir or the dataset (resnet_jax.evaluation).
    record = {
        'identity': identity,
        'config': json.loads(workdir_lib.config_json(config)),
        'input': preprocessing.RunInput.of(preprocess[False], ds.image_size).to_json(),
    }
    ctx = actions.Context(config, workdir, checkpoint_dir, manager, writer, lock, record, evaluate)
    return Run(ctx, state, first_step, meta, train_step, batches, mesh, 'test' in splits, closers)


class _FirstBatchRead:
    """`batches` with the first one read at once: an input error (a damaged image, a record of
    the wrong shape) refuses the start before the run's record is written."""

    def __init__(self, batches: Any):
        self._batches = batches
        self._first = [next(batches)]

    def __iter__(self) -> _FirstBatchRead:
        return self

    def __next__(self) -> Any:
        return self._first.pop() if self._first else next(self._batches)

    def close(self) -> None:
        self._first = []
        self._batches.close()


def _close_manager(manager: Any, timeout: float) -> None:
    """Waits for pending saves, then closes the manager. A failed save is raised (`close_all`
    says it once, or not at all when the run's own error is on its way out); a stalled store
    is given up on, not waited for twice."""
    try:
        checkpoint.wait(manager, timeout)
    except checkpoint.SaveError as e:
        if not e.hard_exit:
            with contextlib.suppress(Exception):
                checkpoint.close(manager, timeout)
        raise
    checkpoint.close(manager, timeout)


def run_loop(run: Run, loop: actions.Loop, sequence: list[actions.Action]) -> actions.Loop:
    """Train steps until the last step or until an action sets `loop.stop`."""
    while not loop.last:
        run.train_step(loop, run.batches)  # one step, or steps_per_call of them
        for action in sequence:
            action(run.ctx, loop)
        if loop.stop:
            break
    return loop


def finish(run: Run, loop: actions.Loop) -> dict[str, float]:
    """The final validation (and test) metrics; the test ones written once per step."""
    ctx = run.ctx
    # A rerun of a finished workdir trains nothing: it reports the checkpoint's metrics.
    final = dict(loop.eval_metrics or ctx.evaluate(loop.state, 'eval'))
    if not checkpoint.committed_steps(ctx.checkpoint_dir):
        # An evaluation-only run (total_steps=0, e.g. of init_from weights): save what was
        # evaluated, so that evaluate, analysis and a later longer run can start from it.
        loop.eval_metrics = final
        actions.Checkpoint()(ctx, loop)
    if run.has_test:
        test = ctx.evaluate(loop.state, 'test')
        final.update(test)
        if not ctx.writer.recorded(loop.step, 'test/'):
            ctx.writer.write(loop.step, test)
    summary = ', '.join(f'{k} {v:.4f}' for k, v in sorted(final.items()) if 'num_examples' not in k)
    logger.info(
        'done at step %d (%d this run): %s; wrote %s and %s',
        loop.step,
        loop.step - run.first_step,
        summary,
        ctx.writer.path,
        ctx.checkpoint_dir,
    )
    return final


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    extra_actions: Sequence[actions.Action] = (),
    start_over: bool = False,
) -> dict[str, float]:
    """Trains and evaluates as `config` says; resumes from `workdir` if it holds a checkpoint.

    Args:
      extra_actions: called after every step, after the eval and before the checkpoint
        (resnet_jax.actions; docs/extending.md).
      start_over: start from step 0 in a workdir whose checkpoints were all set aside as
        damaged (its earlier records are moved to previous/); without it that start is refused.

    Returns:
      The final validation (and test) metrics, or {'preempted_at_step': N} when a preemption
      notice stopped the run (its step is saved).

    Raises:
      signals.Interrupted: a stop signal before the first step or during the final evaluation,
        where there is no step to save.
    """
    closers: list[Any] = []
    try:
        result = _train(config, workdir, extra_actions, closers, start_over)
    except BaseException:
        close_all(closers, raise_first=False)  # the error on its way out is the one to report
        raise
    close_all(closers, raise_first=True)
    return result


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    extra_actions: Sequence[actions.Action],
    closers: list[Any],
    start_over: bool,
) -> dict[str, float]:
    watch = actions.PreemptionWatch()  # before the lock is taken: no signal is missed
    closers.append(watch.close)
    try:
        run = build_run(config, workdir, closers, start_over=start_over)
    except signals.Interrupted as e:
        raise signals.Interrupted(e.signum, 'before the first step; rerun to start') from None
    progress = actions.Progress(config.total_steps, run.first_step)
    closers.append(progress.close)
    pending = list(run.meta.get('pending_train_metrics', []))
    loop = actions.Loop(run.state, run.first_step, config.total_steps, pending)
    sequence = [
        actions.PreemptionCheck(watch),
        actions.NonFiniteCheck(),
        actions.TrainLog(),
        actions.Evaluate(),
        *extra_actions,
        actions.Checkpoint(),
        progress,
    ]
    watch.save_on_signal()
    loop = run_loop(run, loop, sequence)
    if loop.preempted:
        return {'preempted_at_step': float(loop.step)}
    watch.stop_on_signal()  # the last step is saved: nothing left to save on a signal
    try:
        return finish(run, loop)
    except signals.Interrupted as e:
        raise signals.Interrupted(
            e.signum, f'during the final evaluation; step {loop.step} is saved: rerun to evaluate'
        ) from None


def close_all(closers: list[Any], *, raise_first: bool) -> None:
    """Calls every closer, newest first, even when some fail (a store that went away fails
    them all): the lock, the checkpoint manager, the writer and the data workers each get
    their chance. The first failure is raised if `raise_first`. Otherwise an error is already on
    its way out and is the one line the user needs (a full disk fails the writer's flush too):
    the closers' failures are its echoes and are logged at debug level only."""
    first = None
    log = logger.warning if raise_first else logger.debug
    for close in reversed(closers):
        try:
            close()
        except Exception as e:
            log('while closing the run: %s: %s', type(e).__name__, e)
            first = first or e
    if first is not None and raise_first:
        raise first
