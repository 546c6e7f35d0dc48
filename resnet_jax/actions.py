"""The training loop's periodic actions: what happens between train steps, one class each.

After every train step the trainer calls each action, in order, with the run's `Context`
(what was built once: config, writer, checkpoint manager, eval function) and the `Loop` (what
changes from step to step: state, step, metrics not yet logged). An action decides itself
whether it is due. The default sequence:

    PreemptionCheck  SIGTERM / Ctrl-C seen by every process? then save and stop after this step
    NonFiniteCheck   at each host sync point: a NaN/Inf step stops the run (or is counted)
    TrainLog         every log_every_steps: the mean train metrics -> metrics.jsonl, TensorBoard
    Evaluate         every eval_every_steps: the eval split
    ...              the caller's own (`train_and_evaluate(..., extra_actions=[...])`)
    Checkpoint       when the save policy says so, at the last step, and when preempted
    Progress         the progress bar on a terminal, one log line per interval elsewhere

A new action is a callable `action(ctx, loop)`; docs/extending.md shows one that logs the
weight norm of every layer. Actions that write metrics should write through `ctx.writer` and
before the Checkpoint of the same step, so a resumed run writes each step once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
import tqdm

from resnet_jax import checkpoint, metrics, signals
from resnet_jax.lock import WorkdirInUse, WorkdirLock

logger = logging.getLogger('resnet_jax')


@dataclasses.dataclass
class Context:
    """What the run built once, for the actions to use."""

    config: Any
    workdir: str
    checkpoint_dir: str
    manager: Any  # orbax CheckpointManager
    writer: metrics.MetricWriter
    lock: WorkdirLock
    # What each checkpoint records beside the state: its identity, the config it is saved
    # under and the input its network expects (a resume and every reader check against it).
    record: dict[str, Any]
    evaluate: Callable[[Any, str], dict[str, float]]  # (state, 'eval' or 'test') -> metrics


@dataclasses.dataclass
class Loop:
    """What the loop carries from step to step; actions read and change it."""

    state: Any
    step: int
    total_steps: int
    pending: list[dict[str, Any]]  # metrics of the steps since the last log line (on device)
    unchecked: list[tuple[int, Any]] = dataclasses.field(default_factory=list)
    skipped: int = 0  # updates skipped for non-finite values, this run
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    record: dict[str, float] = dataclasses.field(default_factory=dict)  # the last train log
    preempted: bool = False
    stop: bool = False  # set by an action: leave the loop after this step
    interval_start: float = dataclasses.field(default_factory=time.perf_counter)
    interval_steps: int = 0  # steps of this process since the last log line (for images/s)
    advanced: int = 1  # steps the last call took (config.steps_per_call, or 1)

    @property
    def last(self) -> bool:
        return self.step >= self.total_steps

    def record_step(self, step_metrics: dict[str, Any]) -> None:
        """Called by the loop after each train step with the step's (device) metrics."""
        self.step += 1
        self.interval_steps += 1
        self.pending.append(step_metrics)
        self.unchecked.append((self.step, step_metrics['nonfinite']))


class Action(Protocol):
    def __call__(self, ctx: Context, loop: Loop) -> None: ...


def every(steps: int, loop: Loop) -> bool:
    """True every `steps` steps and at the last step."""
    return loop.step % steps == 0 or loop.last


def checkpoint_due(ctx: Context, loop: Loop) -> bool:
    return loop.last or loop.preempted or ctx.manager.should_save(loop.step)


class PreemptionWatch:
    """Has a preemption notice (SIGTERM, SIGHUP or Ctrl-C) arrived? Every process gets the same
    answer.

    One process: while the loop runs (`save_on_signal`), a handler for the stop signals sets a
    flag, checked between steps: the run saves the step and stops. Before and after the loop
    (`stop_on_signal`: set-up, final evaluation) there is no step to save, and a signal stops
    the run at once (`resnet_jax.signals.Interrupted`); the handlers are in place from the
    start, before the workdir's lock is taken. A second Ctrl-C stops at once, without a save.

    Several processes: JAX's preemption sync manager (started by jax.distributed.initialize)
    catches SIGTERM and picks a step every process reaches; Orbax asks it. SIGINT and SIGHUP
    are turned into a SIGTERM to this process, so they too save and exit.
    """

    def __init__(self):
        self._signalled = False
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1
        if self._multi:
            self._set({signal.SIGINT: self._forward, signal.SIGHUP: self._forward})
        else:
            self.stop_on_signal()

    def _set(self, handlers: dict[int, Any]) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (a run started from a thread)
        for signum, handler in handlers.items():
            previous = signal.signal(signum, handler)
            self._previous.setdefault(signum, previous)

    def stop_on_signal(self) -> None:
        """From now on a stop signal raises `signals.Interrupted` (one process)."""
        if not self._multi:
            self._set(dict.fromkeys(signals.STOP_SIGNALS, signals.raise_interrupted))

    def save_on_signal(self) -> None:
        """From now on a stop signal asks the loop to save and stop (one process)."""
        if not self._multi:
            self._set(dict.fromkeys(signals.STOP_SIGNALS, self._on_signal))

    def _on_signal(self, signum, frame):
        del frame
        signals.note(signum)
        if self._signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self._signalled = True
        logger.warning(
            'got %s: stopping at the next step and saving it', signal.Signals(signum).name
        )

    @staticmethod
    def _forward(signum, frame):
        del frame
        signals.note(signum)
        os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int, manager: Any) -> bool:
        if not self._multi:
            return self._signalled
        return manager.reached_preemption(step)

    def close(self) -> None:
        signals.restore(self._previous)
        self._previous = {}


@dataclasses.dataclass
class PreemptionCheck:
    watch: PreemptionWatch

    def __call__(self, ctx: Context, loop: Loop) -> None:
        # Every step of the last call is asked about in order: the processes of a pod agree on
        # one step to stop at, which may fall inside a call of several steps; all then stop at
        # the end of that call.
        steps = range(loop.step - loop.advanced + 1, loop.step + 1)
        answers = [self.watch.reached(step, ctx.manager) for step in steps]  # each asked
        loop.preempted = any(answers)
        loop.stop = loop.stop or loop.preempted


class NonFiniteCheck:
    """Fetches the non-finite flags of the steps since the last check, at the steps where the
    host syncs anyway (logging, saving): nothing non-finite is ever saved."""

    def __call__(self, ctx: Context, loop: Loop) -> None:
        if not (every(ctx.config.log_every_steps, loop) or checkpoint_due(ctx, loop)):
            return
        flags = jax.device_get([flag for _, flag in loop.unchecked])
        bad = [s for (s, _), flag in zip(loop.unchecked, flags, strict=True) if flag]
        loop.unchecked = []
        latest = ctx.manager.latest_step()
        where = (
            f'There is no checkpoint yet in {ctx.checkpoint_dir}.'
            if latest is None
            else f'The last checkpoint is step {latest} in {ctx.checkpoint_dir}.'
        )
        if bad and ctx.config.nonfinite == 'stop':
            raise FloatingPointError(
                f'the loss or the gradients are not finite at step {bad[0]}; stopped without '
                f'saving it. {where} Lower the learning rate, or set nonfinite=skip.'
            )
        loop.skipped += len(bad)
        if bad and loop.skipped > ctx.config.max_skipped_steps:
            raise FloatingPointError(
                f'{loop.skipped} updates skipped for non-finite values (the last at step '
                f'{bad[-1]}), more than max_skipped_steps={ctx.config.max_skipped_steps}. {where}'
            )


def mean_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    # In float64 whatever the records hold (device float32, or floats from a checkpoint), so a
    # resumed run logs bit-for-bit what an uninterrupted one does.
    return {k: float(np.mean(np.asarray([r[k] for r in records], np.float64))) for k in records[0]}


class TrainLog:
    """The mean train metrics of the steps since the last log line (skipped steps left out)."""

    def __call__(self, ctx: Context, loop: Loop) -> None:
        if not every(ctx.config.log_every_steps, loop):
            return
        records = [r for r in jax.device_get(loop.pending) if not r.pop('nonfinite')]
        record = {f'train/{k}': v for k, v in mean_metrics(records).items()} if records else {}
        record['train/skipped_steps'] = float(len(loop.pending) - len(records))
        # The first interval after a (re)start includes compilation.
        elapsed = time.perf_counter() - loop.interval_start
        record['train/images_per_sec'] = loop.interval_steps * ctx.config.batch_size / elapsed
        ctx.writer.write(loop.step, record)
        loop.record = record
        loop.pending = []
        loop.interval_start, loop.interval_steps = time.perf_counter(), 0


class Evaluate:
    def __call__(self, ctx: Context, loop: Loop) -> None:
        if every(ctx.config.eval_every_steps, loop):
            loop.eval_metrics = ctx.evaluate(loop.state, 'eval')
            ctx.writer.write(loop.step, loop.eval_metrics)


class Checkpoint:
    """Saves the state, with its identity and the metrics not logged yet, when due; waits for
    the save to commit at the last step and when preempted."""

    def __call__(self, ctx: Context, loop: Loop) -> None:
        if not checkpoint_due(ctx, loop):
            return
        ctx.lock.check_heartbeat()
        if ctx.lock.lost:
            raise WorkdirInUse(
                f'another trainer took over {ctx.workdir!r} (its lock was judged stale); '
                f'stopped at step {loop.step} without saving'
            )
        not_logged = [{k: float(v) for k, v in r.items()} for r in jax.device_get(loop.pending)]
        meta = {**ctx.record, 'pending_train_metrics': not_logged}
        evaluated = every(ctx.config.eval_every_steps, loop)
        try:
            checkpoint.save(
                ctx.manager,
                loop.step,
                loop.state,
                meta=meta,
                metrics=loop.eval_metrics if evaluated else None,
                force=loop.last or loop.preempted,
                timeout=ctx.config.storage_timeout_seconds,
            )
            if loop.preempted or loop.last:
                checkpoint.wait(ctx.manager, ctx.config.storage_timeout_seconds)
        except checkpoint.SaveError as e:
            if not e.hard_exit:  # earlier saves may still be committing
                with contextlib.suppress(Exception):
                    checkpoint.wait(ctx.manager, ctx.config.storage_timeout_seconds)
            raise
        if loop.preempted:
            logger.warning(
                'preempted: saved step %d in %s; rerun the same command to resume',
                loop.step,
                ctx.checkpoint_dir,
            )


class Progress:
    """A progress bar on a terminal; in a log file (a cluster job), a line per log interval."""

    def __init__(self, total_steps: int, first_step: int):
        self.enabled = jax.process_index() == 0  # logging on process 0 only
        self.interactive = self.enabled and sys.stderr.isatty()
        self.bar = tqdm.tqdm(
            total=total_steps,
            initial=first_step,
            disable=not self.interactive,
            unit='step',
            dynamic_ncols=True,
        )

    def __call__(self, ctx: Context, loop: Loop) -> None:
        self.bar.update(1)
        if not self.enabled or not every(ctx.config.log_every_steps, loop) or not loop.record:
            return
        loss = loop.record.get('train/loss', float('nan'))
        top1 = loop.record.get('train/top1_acc', float('nan'))
        speed = loop.record['train/images_per_sec']
        self.bar.set_postfix(loss=f'{loss:.3f}', acc=f'{top1:.3f}', img_s=f'{speed:.0f}')
        if not self.interactive:
            logger.info(
                'step %d/%d: loss %.4f, top-1 %.4f, %.0f images/s',
                loop.step,
                loop.total_steps,
                loss,
                top1,
                speed,
            )

    def close(self) -> None:
        self.bar.close()
