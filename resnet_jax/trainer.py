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
import json
import logging
import os
import signal
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
from resnet_jax.train_state import TrainState, create_train_state

logger = logging.getLogger('resnet_jax')


# Fields that decide the shapes of the state: a checkpoint cannot continue under other values.
STATE_DEFINING_FIELDS = (
    'model.name',
    'model.shortcut',
    'model.scan_blocks',
    'dataset.name',
    'optimizer.name',
    'optimizer.ema_decay',
)
RUN_CONFIG_FILE = 'config.json'


def _field(config: Any, dotted: str) -> Any:
    for part in dotted.split('.'):
        config = config[part]
    return config


def _check_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir whose run has another model or optimizer; records the config if new.

    The values that shape the state are compared before anything is restored, so a mistyped
    --workdir or --config gets one clear line instead of a shape error from deep in Orbax.
    """
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        for field in STATE_DEFINING_FIELDS:
            try:
                before = _field(previous, field)
            except KeyError:
                continue
            now = _field(config, field)
            if bool(before) != bool(now) if field == 'optimizer.ema_decay' else before != now:
                raise ValueError(
                    f'workdir {workdir!r} holds a run with {field}={before!r} ({path}); this '
                    f'config has {field}={now!r}. Use another workdir, or the same config.'
                )
    elif jax.process_index() == 0:
        paths.write_text_atomic(path, config.to_json_best_effort(indent=1, sort_keys=True))


def _restore_latest_good(manager: Any, abstract_state: Any) -> tuple[TrainState | None, list[str]]:
    """The newest checkpoint that verifies and restores; bad ones are set aside, never reused.

    Returns:
      (state or None if there is no checkpoint, a message per checkpoint set aside).
    Raises:
      ValueError: checkpoints exist but none is usable, or the newest one whose fingerprint
        matches does not fit this config's state (a different model, not corruption).
    """
    directory = os.fspath(manager.directory)
    set_aside = []
    for step in sorted(manager.all_steps(), reverse=True):
        problem = checkpoint.verify(directory, step)
        if problem is None:
            try:
                return checkpoint.restore(manager, step, abstract_state), set_aside
            except Exception as e:  # Orbax raises many kinds for bad files
                if checkpoint.has_fingerprint(directory, step):
                    raise ValueError(
                        f'checkpoint step {step} in {directory!r} is intact but does not fit '
                        f'this config ({type(e).__name__}: {str(e)[:300]}); expected a '
                        'checkpoint of the same model and optimizer'
                    ) from None
                problem = f'it cannot be read ({type(e).__name__}: {str(e)[:200]})'
        moved = checkpoint.quarantine(directory, step) if jax.process_index() == 0 else '?'
        set_aside.append(f'checkpoint step {step} is bad: {problem}; moved to {moved}')
        logger.warning('%s; falling back to the previous checkpoint', set_aside[-1])
        manager.reload()
    if set_aside:
        raise ValueError(f'no usable checkpoint in {directory!r}: ' + '; '.join(set_aside))
    return None, set_aside


class _PreemptionWatch:
    """Has a preemption notice (SIGTERM) arrived? Every process gets the same answer per step.

    Multi-process: JAX's preemption sync manager (started by jax.distributed.initialize)
    catches SIGTERM and picks a step every process reaches; Orbax asks it. One process: a
    SIGTERM handler sets a flag, checked between steps.
    """

    def __init__(self, manager: Any):
        self._manager = manager
        self._signalled = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._signalled = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._signalled
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


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
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


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
    init = functools.partial(create_train_state, model, tx, config.seed, image_shape)
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
    workdir = paths.writable_dir(workdir, 'workdir')
    _check_run_config(workdir, config)

    # 2. Model, optimizer, abstract state and its shardings.
    model, tx, schedule, init = build_training(config, info, len(train_source))
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
        state, _ = _restore_latest_good(manager, target)
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
        ),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        steps.make_eval_step(model, use_ema=bool(config.optimizer.ema_decay)),
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
    writer = metrics.MetricWriter(workdir)
    preemption = _PreemptionWatch(manager)
    step = int(jax.device_get(state.step))
    first_step = step
    progress = tqdm.tqdm(
        total=config.total_steps,
        initial=step,
        disable=jax.process_index() != 0,
        unit='step',
        dynamic_ncols=True,
    )
    pending: list[dict[str, Any]] = []  # metrics of the steps since the last log, on device
    unchecked: list[tuple[int, Any]] = []  # (step, nonfinite flag) not yet fetched
    skipped = 0
    interval_start = time.perf_counter()
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
                record['train/images_per_sec'] = len(pending) * config.batch_size / elapsed
                writer.write(step, record)
                progress.set_postfix(
                    loss=f'{record.get("train/loss", float("nan")):.3f}',
                    acc=f'{record.get("train/top1_acc", float("nan")):.3f}',
                    img_s=f'{record["train/images_per_sec"]:.0f}',
                )
                pending = []
                interval_start = time.perf_counter()
            if evaluated:
                eval_metrics = run_eval(state, eval_source, eval_preprocess, prefix='eval')
                writer.write(step, eval_metrics)
            try:
                checkpoint.save(
                    manager,
                    step,
                    state,
                    metrics=eval_metrics if evaluated else None,
                    force=last or preempted,
                )
                if preempted or last:
                    checkpoint.wait(manager)
            except OSError as e:
                with contextlib.suppress(OSError):
                    manager.wait_until_finished()  # earlier saves may still be committing
                raise checkpoint.SaveError(step, checkpoint_dir, e) from None
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
                final.update(run_eval(state, test_source, eval_preprocess, prefix='test'))
                writer.write(step, {k: v for k, v in final.items() if k.startswith('test/')})
    finally:
        preemption.close()
        progress.close()
        try:
            checkpoint.wait(manager)
        except OSError as e:
            logger.error('the last checkpoint save failed: %s', e)
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
