"""train_and_evaluate(config, workdir): the whole training run, phases in order.

1. Validate the config and open the data (nothing is written before both pass).
2. Build the mesh, the model, the optimizer and the abstract state; derive its shardings.
3. Restore the newest good checkpoint of the workdir, or initialise the state directly on the
   devices; the data stream starts at the state's step.
4. Train: one jitted step per global batch; metrics fetched only when logged; eval and
   checkpoints on schedule; stop cleanly at a preemption sync point.
5. Final eval on the validation and test splits, wait for pending saves, one summary line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax import checkpoint, data, metrics, optim, paths, sharding, steps
from resnet_jax import config as config_lib
from resnet_jax import workdir as workdir_lib
from resnet_jax.train_state import TrainState, create_train_state

logger = logging.getLogger('resnet_jax')


RUN_CONFIG_FILE = workdir_lib.CONFIG_FILE


def _check_run_config(workdir: str, config: ml_collections.ConfigDict, identity: dict) -> None:
    """Refuses a workdir whose run is of another network or optimizer; records the config if new.

    Compared before anything is restored, so a mistyped --workdir or --config gets one clear
    line instead of a shape error from deep in Orbax (each checkpoint is checked again on its
    own record when restored: a workdir without config.json is no way around it).
    """
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    if os.path.exists(path):
        recorded = workdir_lib.read_config(workdir)
        try:
            model = config_lib.create_model_from_config(recorded, identity['model.num_classes'])
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f'{path} does not describe a run of this version: {e}') from None
        workdir_lib.check_identity(
            workdir_lib.identity(recorded, model), identity, f'the run in {workdir!r} ({path})'
        )
    elif jax.process_index() == 0:
        paths.write_text_atomic(path, workdir_lib.config_json(config))


def _restore_latest_good(
    manager: Any, abstract_state: Any, identity: dict[str, Any]
) -> tuple[TrainState | None, dict[str, Any]]:
    """The newest checkpoint that verifies and restores; bad ones are set aside, never reused.

    Returns:
      (state or None if there is no checkpoint, the step's meta).
    Raises:
      ValueError: checkpoints exist but none is usable, or the newest one is of another network
        or optimizer (a mistake in the config, not corruption: nothing is set aside).
    """
    directory = os.fspath(manager.directory)
    set_aside = []
    for step in sorted(manager.all_steps(), reverse=True):
        problem = checkpoint.verify(directory, step)
        if problem is None:
            try:
                meta = checkpoint.read_meta(manager, step)
            except ValueError as e:
                problem = str(e)
            else:
                where = f'checkpoint step {step} in {directory!r}'
                workdir_lib.check_identity(meta['identity'], identity, where)
                try:
                    return checkpoint.restore(manager, step, abstract_state)
                except Exception as e:  # Orbax raises many kinds for bad files
                    problem = f'it cannot be read ({type(e).__name__}: {str(e)[:200]})'
        moved = checkpoint.quarantine(directory, step) if jax.process_index() == 0 else '?'
        set_aside.append(f'checkpoint step {step} is bad: {problem}; moved to {moved}')
        logger.warning('%s; falling back to the previous checkpoint', set_aside[-1])
        manager.reload()
    if set_aside:
        raise ValueError(f'no usable checkpoint in {directory!r}: ' + '; '.join(set_aside))
    return None, {}


class _PreemptionWatch:
    """Has a preemption notice (SIGTERM, or Ctrl-C) arrived? Every process gets the same answer.

    Multi-process: JAX's preemption sync manager (started by jax.distributed.initialize)
    catches SIGTERM and picks a step every process reaches; Orbax asks it. SIGINT is turned into
    a SIGTERM to this process, so Ctrl-C also saves and exits. One process: a handler for both
    signals sets a flag, checked between steps.
    """

    def __init__(self, manager: Any):
        self._manager = manager
        self._signalled = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        if jax.process_count() == 1:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        else:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward_sigint)

    def _on_signal(self, signum, frame):
        del frame
        if self._signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self._signalled = True
        logger.warning(
            'got %s: stopping at the next step and saving it', signal.Signals(signum).name
        )

    @staticmethod
    def _forward_sigint(signum, frame):
        del signum, frame
        os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._signalled
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def _close(iterator: Any) -> None:
    close = getattr(iterator, 'close', None)  # Grain's multiprocess iterators hold workers
    if close:
        close()


def evaluate_split(
    eval_step: Any,
    state: TrainState,
    source: Any,
    preprocess: data.Preprocess,
    *,
    batch_size: int,
    mesh: Any,
    prefix: str,
    num_workers: int = 0,
) -> dict[str, float]:
    """Exact metrics over a whole split: masked sums divided by the real example count."""
    sums = None
    for local in data.eval_dataset(
        source, preprocess, batch_size=batch_size, num_workers=num_workers
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


def _mean(records: list[dict[str, Any]]) -> dict[str, float]:
    # In float64 whatever the records hold (device float32, or floats from a checkpoint), so a
    # resumed run logs bit-for-bit what an uninterrupted one does.
    return {k: float(np.mean(np.asarray([r[k] for r in records], np.float64))) for k in records[0]}


def build_training(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, num_train_examples: int
) -> tuple[Any, optax.GradientTransformation, optax.Schedule, Any]:
    """The model, optimizer, schedule and the state's init function of a config."""
    steps_per_epoch = max(1, num_train_examples // config.batch_size)
    image_shape = info.image_shape or (224, 224, 3)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains and evaluates as `config` says; resumes from `workdir` if it holds a checkpoint.

    Returns:
      The final validation (and test) metrics.
    """
    # 1. Everything that can be wrong is checked before the workdir is touched.
    config_lib.validate(config, jax.device_count(), jax.process_count())
    ds = config.dataset
    train_source, info = data.open_split(ds.name, ds.train_split, ds.data_dir, download=ds.download)
    eval_source, _ = data.open_split(ds.name, ds.eval_split, ds.data_dir)
    test_source = data.open_split(ds.name, ds.test_split, ds.data_dir)[0] if ds.test_split else None
    mesh = sharding.data_mesh()
    local_batch = sharding.local_batch_size(config.batch_size, mesh)
    local_eval_batch = sharding.local_batch_size(config.eval_batch_size, mesh)
    if len(train_source) < config.batch_size:
        raise ValueError(
            f'batch_size {config.batch_size} exceeds the {len(train_source)} examples of '
            f'{ds.train_split!r}'
        )
    model, tx, schedule, init = build_training(config, info, len(train_source))
    identity = workdir_lib.identity(config, model)
    workdir = paths.writable_dir(workdir, 'workdir')
    lock = _lock_workdir(workdir)
    try:
        _check_run_config(workdir, config, identity)
        return _train_in(
            config,
            workdir,
            lock,
            identity,
            mesh,
            info,
            model,
            tx,
            schedule,
            init,
            (train_source, eval_source, test_source),
            local_batch,
            local_eval_batch,
        )
    finally:
        lock.release()


def _lock_workdir(workdir: str) -> workdir_lib.WorkdirLock:
    """Process 0 takes the workdir's lock; every process learns whether it got it."""
    lock = workdir_lib.WorkdirLock(workdir)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except workdir_lib.WorkdirInUse as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        held = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not held and error is None:
            error = workdir_lib.WorkdirInUse(
                f'workdir {workdir!r} is in use by another trainer (see process 0)'
            )
    if error is not None:
        raise error
    return lock


def _train_in(
    config,
    workdir,
    lock,
    identity,
    mesh,
    info,
    model,
    tx,
    schedule,
    init,
    sources,
    local_batch,
    local_eval_batch,
):
    ds = config.dataset
    train_source, eval_source, test_source = sources
    # 2. Abstract state and its shardings.
    abstract_state = jax.eval_shape(init)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = sharding.state_shardings(
        abstract_state, mesh, fsdp=config.fsdp, fsdp_min_size=config.fsdp_min_size
    )

    train_preprocess = data.make_preprocess(
        info,
        train=True,
        data_dir=ds.data_dir,
        augmentation=ds.augmentation,
        normalization=ds.normalization,
    )
    eval_preprocess = data.make_preprocess(
        info, train=False, data_dir=ds.data_dir, normalization=ds.normalization
    )
    # 3. Resume from the newest good checkpoint, or initialise directly on the devices.
    checkpoint_dir = os.path.join(workdir, 'checkpoints')
    manager = checkpoint.create_manager(
        checkpoint_dir,
        save_every_steps=config.checkpoint_every_steps,
        keep=config.keep_checkpoints,
    )
    target = checkpoint.abstract_with_shardings(abstract_state, state_shardings)
    try:
        state, meta = _restore_latest_good(manager, target, identity)
    except BaseException:
        manager.close()
        raise
    if state is None:
        state = jax.jit(init, out_shardings=state_shardings)()
    else:
        logger.info('resumed from %s at step %d', checkpoint_dir, int(jax.device_get(state.step)))
    # The data stream is a function of the step: resuming needs no iterator state.
    train_iter = iter(
        data.train_dataset(
            train_source,
            train_preprocess,
            batch_size=local_batch,
            seed=config.seed,
            start_batch=int(jax.device_get(state.step)),
            num_workers=ds.num_workers,
        )
    )

    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        steps.make_train_step(
            model,
            tx,
            schedule,
            label_smoothing=config.label_smoothing,
            bn_group_size=config.bn_group_size,
            skip_nonfinite=config.nonfinite == 'skip',
            ema_decay=config.optimizer.ema_decay,
        ),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        steps.make_eval_step(model),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=replicated,
    )
    run_eval = functools.partial(
        evaluate_split,
        eval_step,
        batch_size=local_eval_batch,
        mesh=mesh,
        num_workers=ds.num_workers,
    )

    # 4. Train.
    step = int(jax.device_get(state.step))
    first_step = step
    writer = metrics.MetricWriter(workdir, resume_step=step)
    preemption = _PreemptionWatch(manager)
    # A progress bar on a terminal; in a log file (a cluster job), one line per log interval.
    interactive = jax.process_index() == 0 and sys.stderr.isatty()
    progress = tqdm.tqdm(
        total=config.total_steps,
        initial=step,
        disable=not interactive,
        unit='step',
        dynamic_ncols=True,
    )
    # Metrics of the steps since the last log line (on device until logged); a checkpoint
    # carries them, so the first log line after a resume averages the same steps as without.
    pending: list[dict[str, Any]] = list(meta.get('pending_train_metrics', []))
    unchecked: list[tuple[int, Any]] = []  # (step, nonfinite flag) not yet fetched
    skipped = 0
    interval_start, interval_steps = time.perf_counter(), 0  # for images/s: this process only
    eval_metrics: dict[str, float] = {}
    preempted = False
    final: dict[str, float] = {}

    def check_finite() -> None:
        """Fetches the non-finite flags of the steps since the last check; stops or counts."""
        nonlocal skipped, unchecked
        flags = jax.device_get([flag for _, flag in unchecked])
        bad = [s for (s, _), flag in zip(unchecked, flags, strict=True) if flag]
        unchecked = []
        if bad and config.nonfinite == 'stop':
            raise FloatingPointError(
                f'the loss or the gradients are not finite at step {bad[0]}; stopped without '
                f'saving it. The last checkpoint is step {manager.latest_step()} in '
                f'{checkpoint_dir}. Lower the learning rate, or set nonfinite=skip.'
            )
        skipped += len(bad)
        if bad and skipped > config.max_skipped_steps:
            raise FloatingPointError(
                f'{skipped} updates skipped for non-finite values (the last at step {bad[-1]}), '
                f'more than max_skipped_steps={config.max_skipped_steps}. The last checkpoint '
                f'is step {manager.latest_step()} in {checkpoint_dir}.'
            )

    try:
        while step < config.total_steps:
            batch = sharding.global_batch(next(train_iter), mesh)
            state, step_metrics = train_step(state, batch)
            step += 1
            interval_steps += 1
            pending.append(step_metrics)
            unchecked.append((step, step_metrics['nonfinite']))
            last = step == config.total_steps
            preempted = preemption.reached(step)
            evaluated = step % config.eval_every_steps == 0 or last
            saving = last or preempted or manager.should_save(step)
            if step % config.log_every_steps == 0 or last or saving:
                check_finite()  # the one sync point of the interval; nothing non-finite is saved
            if step % config.log_every_steps == 0 or last:
                records = [r for r in jax.device_get(pending) if not r.pop('nonfinite')]
                record = {f'train/{k}': v for k, v in _mean(records).items()} if records else {}
                record['train/skipped_steps'] = float(len(pending) - len(records))
                # The first interval after a (re)start includes compilation.
                elapsed = time.perf_counter() - interval_start
                record['train/images_per_sec'] = interval_steps * config.batch_size / elapsed
                writer.write(step, record)
                progress.set_postfix(
                    loss=f'{record.get("train/loss", float("nan")):.3f}',
                    acc=f'{record.get("train/top1_acc", float("nan")):.3f}',
                    img_s=f'{record["train/images_per_sec"]:.0f}',
                )
                if not interactive:
                    logger.info(
                        'step %d/%d: loss %.4f, top-1 %.4f, %.0f images/s',
                        step,
                        config.total_steps,
                        record.get('train/loss', float('nan')),
                        record.get('train/top1_acc', float('nan')),
                        record['train/images_per_sec'],
                    )
                pending = []
                interval_start, interval_steps = time.perf_counter(), 0
            if evaluated:
                eval_metrics = run_eval(state, eval_source, eval_preprocess, prefix='eval')
                writer.write(step, eval_metrics)
            if saving:
                if lock.lost:
                    raise workdir_lib.WorkdirInUse(
                        f'another trainer took over {workdir!r} (its lock was judged stale); '
                        f'stopped at step {step} without saving'
                    )
                logged_later = [
                    {k: float(v) for k, v in r.items()} for r in jax.device_get(pending)
                ]
                meta = {'identity': identity, 'pending_train_metrics': logged_later}
                try:
                    checkpoint.save(
                        manager,
                        step,
                        state,
                        meta=meta,
                        metrics=eval_metrics if evaluated else None,
                        force=last or preempted,
                    )
                    if preempted or last:
                        checkpoint.wait(manager)
                except checkpoint.SaveError:
                    with contextlib.suppress(Exception):
                        manager.wait_until_finished()  # earlier saves may still be committing
                    raise
            progress.update(1)
            if preempted:
                logger.warning(
                    'preempted: saved step %d in %s; rerun the same command to resume',
                    step,
                    checkpoint_dir,
                )
                break
        # 5. Final metrics and summary.
        if not preempted:
            if not eval_metrics:
                # Rerun of a finished workdir: nothing to train; report the checkpoint's metrics.
                eval_metrics = run_eval(state, eval_source, eval_preprocess, prefix='eval')
            final = dict(eval_metrics)
            if test_source is not None:
                test = run_eval(state, test_source, eval_preprocess, prefix='test')
                final.update(test)
                if not writer.recorded(step, 'test/'):  # a rerun of a finished run: once only
                    writer.write(step, test)
    finally:
        preemption.close()
        progress.close()
        try:
            checkpoint.wait(manager)
        except checkpoint.SaveError as e:
            logger.error('%s', e)
        manager.close()
        writer.close()
        _close(train_iter)
    if preempted:
        return {'preempted_at_step': float(step)}
    summary = ', '.join(f'{k} {v:.4f}' for k, v in sorted(final.items()) if 'num_examples' not in k)
    logger.info(
        'done at step %d (%d this run): %s; wrote %s and %s',
        step,
        step - first_step,
        summary,
        os.path.join(workdir, 'metrics.jsonl'),
        os.path.join(workdir, 'checkpoints'),
    )
    return final
