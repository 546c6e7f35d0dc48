"""train_and_evaluate(config, workdir): the whole training run, phases in order.

1. Validate the config and open the data (nothing is written before both pass).
2. Build the mesh, the model, the optimizer and the abstract state; derive its shardings.
3. Restore the latest checkpoint of the workdir (state + data iterator), or initialise the
   state directly on the devices.
4. Train: one jitted step per global batch; metrics fetched only when logged; eval and
   checkpoints on schedule; stop cleanly at a preemption sync point.
5. Final eval on the validation and test splits, wait for pending saves, one summary line.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax import checkpoint, data, metrics, optim, sharding, steps
from resnet_jax import config as config_lib
from resnet_jax.train_state import TrainState, create_train_state

logger = logging.getLogger('resnet_jax')


def _check_workdir(workdir: str) -> str:
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f'workdir {workdir!r} cannot be created: {e.strerror}') from None
    if not os.access(workdir, os.W_OK):
        raise ValueError(f'workdir {workdir!r} is not writable')
    return workdir


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
    workdir = _check_workdir(workdir)

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
    train_iter = iter(
        data.train_dataset(
            train_source,
            train_preprocess,
            batch_size=local_batch,
            seed=config.seed,
            num_workers=ds.num_workers,
        )
    )

    # 3. Resume or initialise (directly on the devices, never on one and moved).
    manager = checkpoint.create_manager(
        os.path.join(workdir, 'checkpoints'),
        save_every_steps=config.checkpoint_every_steps,
        keep=config.keep_checkpoints,
    )
    latest = manager.latest_step()
    if latest is not None:
        target = checkpoint.abstract_with_shardings(abstract_state, state_shardings)
        state = checkpoint.restore(manager, latest, target, train_iter)
        logger.info('resumed from %s at step %d', manager.directory, latest)
    else:
        state = jax.jit(init, out_shardings=state_shardings)()

    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        steps.make_train_step(
            model,
            tx,
            schedule,
            label_smoothing=config.label_smoothing,
            bn_group_size=config.bn_group_size,
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
    step = int(jax.device_get(state.step))
    first_step = step
    progress = tqdm.tqdm(
        total=config.total_steps,
        initial=step,
        disable=jax.process_index() != 0,
        unit='step',
        dynamic_ncols=True,
    )
    pending: list[dict[str, Any]] = []
    interval_start = time.perf_counter()
    interval_steps = 0
    eval_metrics: dict[str, float] = {}
    preempted = False
    try:
        while step < config.total_steps:
            batch = sharding.global_batch(next(train_iter), mesh)
            state, step_metrics = train_step(state, batch)
            step += 1
            interval_steps += 1
            pending.append(step_metrics)
            last = step == config.total_steps
            if step % config.log_every_steps == 0 or last:
                train = _mean(jax.device_get(pending))  # the one sync point of the interval
                if not np.isfinite(train['loss']):
                    raise FloatingPointError(
                        f'train/loss is not finite at step {step}; the last checkpoint is '
                        f'{manager.latest_step()}'
                    )
                elapsed = time.perf_counter() - interval_start
                record = {f'train/{k}': v for k, v in train.items()}
                # The first interval after a (re)start includes compilation.
                record['train/images_per_sec'] = interval_steps * config.batch_size / elapsed
                writer.write(step, record)
                progress.set_postfix(
                    loss=f'{train["loss"]:.3f}',
                    acc=f'{train["top1_acc"]:.3f}',
                    img_s=f'{record["train/images_per_sec"]:.0f}',
                )
                pending, interval_steps = [], 0
                interval_start = time.perf_counter()
            evaluated = step % config.eval_every_steps == 0 or last
            if evaluated:
                eval_metrics = run_eval(state, eval_source, eval_preprocess, prefix='eval')
                writer.write(step, eval_metrics)
            preempted = manager.reached_preemption(step)
            checkpoint.save(
                manager,
                step,
                state,
                train_iter,
                metrics=eval_metrics if evaluated else None,
                force=last or preempted,
            )
            progress.update(1)
            if preempted:
                logger.warning('preempted: saved step %d; rerun the same command to resume', step)
                break
        # 5. Final metrics and summary.
        if not eval_metrics and not preempted:
            # Rerun of a finished workdir: nothing to train, report the checkpoint's metrics.
            eval_metrics = run_eval(state, eval_source, eval_preprocess, prefix='eval')
        final = dict(eval_metrics)
        if test_source is not None and not preempted:
            final.update(run_eval(state, test_source, eval_preprocess, prefix='test'))
            writer.write(step, {k: v for k, v in final.items() if k.startswith('test/')})
    finally:
        progress.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
        close = getattr(train_iter, 'close', None)
        if close:
            close()
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
