"""Grain's worker processes (`dataset.num_workers`): they end with their parent, leave signals
to it, and leave no shared memory behind.

`prefetch(dataset, num_workers)` is `dataset.mp_prefetch(...)` with three things Grain (0.2.18)
does not do, each of which users met:

* **They end with their parent.** Grain's workers outlived a trainer killed with SIGKILL (or by
  the OOM killer), about 300 MB each, and with them multiprocessing's resource tracker. Each
  worker now asks the kernel for a signal when its parent dies (`prctl(PR_SET_PDEATHSIG)`,
  Linux). The kernel sends it when the *thread* that started the worker ends, and Grain starts
  workers from its own threads and ends those (at every `close()`) before it stops the workers
  gracefully: with SIGKILL as that signal, every close killed the workers mid-batch and leaked
  shared memory. So the signal is `PARENT_DIED`, whose handler ends the worker only when its
  parent process is gone. A parent that died before the `prctl` is caught by comparing
  `os.getppid()` with the pid recorded when the worker was started. The resource tracker ends
  once no process holds its pipe: with the workers gone, at once.
* **They leave signals to their parent.** Ctrl-C, SLURM's `--signal`, systemd, Kubernetes and a
  dropped ssh session signal the whole process group: the workers too. They printed
  KeyboardInterrupt tracebacks, or died while their parent saved; one that died while it
  started left its parent blocked for good (multiprocessing writing to its pipe). Workers
  ignore SIGINT, SIGTERM and SIGHUP: their parent decides, and closes them. The signals are
  blocked in the thread that starts them, so one that comes in the seconds before a worker
  reaches its init (spawn imports the main module first) waits, then is dropped. The resource
  tracker ignores SIGINT and SIGTERM itself; it is started here with SIGHUP blocked too.
* **No shared memory is left behind.** Workers hand batches over in POSIX shared memory, which
  Grain unlinks when the receiving array is garbage collected. A finished evaluation's last
  batch from each worker stays referenced from a cycle (the frame of Grain's prefetch thread,
  through the StopIteration's traceback) that Python frees only at exit, where the unlink no
  longer runs: every run with workers ended with the resource tracker's "leaked shared_memory"
  warning. The names of a batch's segments are now unlinked as soon as the batch is handed
  over (the memory lives on while the arrays do). An iterator also closes itself when it ends,
  and lets go of Grain's iterators when closed, so they are not first destroyed at exit, whose
  teardown made them print "Exception ignored" tracebacks.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import grain

from resnet_jax import signals

# What a process group is sent by a terminal (Ctrl-C, a closed session) or a scheduler.
GROUP_SIGNALS = frozenset(signals.STOP_SIGNALS)  # what a whole process group is sent to stop
# The kernel's notice to a worker that the thread that started it has ended (its handler checks
# whether the whole parent process has). Not otherwise used in a worker.
PARENT_DIED = signal.SIGUSR2
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def prefetch(dataset: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """`dataset` made by `num_workers` Grain worker processes, each making whole elements."""
    options = grain.MultiprocessingOptions(num_workers=num_workers)
    return _Workers(dataset.mp_prefetch(options, worker_init_fn=_WorkerInit()))


class _WorkerInit:
    """Runs first in each worker (Grain's `worker_init_fn`). Pickled in the process that starts
    the worker, which records its pid: that process is the worker's parent."""

    def __init__(self, parent_pid: int | None = None):
        self.parent_pid = parent_pid

    def __reduce__(self):
        return _WorkerInit, (os.getpid(),)

    def __call__(self, worker_index: int, worker_count: int) -> None:
        del worker_index, worker_count
        for signum in GROUP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # also drops those that came while blocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
        _end_with_parent(self.parent_pid)


def _end_with_parent(parent_pid: int) -> None:
    """Ends this process (at once, printing nothing) when process `parent_pid` dies; Linux."""

    def on_notice(signum, frame):
        del signum, frame
        if os.getppid() != parent_pid:  # not just the thread that started this process
            os._exit(1)

    signal.signal(PARENT_DIED, on_notice)
    if sys.platform.startswith('linux'):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(PARENT_DIED), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')
    if os.getppid() != parent_pid:  # it died before the prctl: no notice will come
        os._exit(1)


@contextlib.contextmanager
def _blocked(signals: frozenset[signal.Signals]):
    """`signals` blocked in this thread, and in the threads and processes it starts."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_resource_tracker() -> None:
    """Starts multiprocessing's resource tracker (if not running) deaf to SIGHUP: it ignores
    SIGINT and SIGTERM itself, but a SIGHUP to the group killed it, and its next use warned
    "resource_tracker: process died unexpectedly, relaunching. Some resources might leak"."""
    with _blocked(GROUP_SIGNALS):
        resource_tracker.ensure_running()


class _Workers(grain.IterDataset):
    def __iter__(self) -> _Batches:
        return _Batches(self._parent.__iter__())

    def __str__(self) -> str:
        return 'Workers'


class _Batches(grain.DatasetIterator):
    """Grain's iterator over the workers' elements, which it starts in its own threads when
    first asked (and again after an error), from this thread: the group's signals are blocked
    here meanwhile, so its threads and the workers inherit the block."""

    def __init__(self, elements: grain.DatasetIterator):
        super().__init__(elements)
        self._tracker_started = False
        self._exhausted = False

    def __next__(self) -> Any:
        if self._exhausted:
            raise StopIteration
        self._assert_not_closed()
        if not self._tracker_started:
            _start_resource_tracker()  # before a worker starts it, with the group's signals
            self._tracker_started = True
        try:
            with _blocked(GROUP_SIGNALS):
                element = next(self._parent)
        except StopIteration:
            self._exhausted = True
            self.close()  # the workers have stopped; Grain's threads and buffers go too
            raise
        _unlink_shared_memory(element)
        return element

    def get_state(self) -> dict[str, Any]:
        self._assert_not_closed()
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._assert_not_closed()
        self._parent.set_state(state)

    def close(self) -> None:
        if self._closed:
            return
        super().close()  # Grain's: its threads, then the workers (each drains its queue)
        self._parents = ()  # destroyed now, not at interpreter exit


def _unlink_shared_memory(element: Any) -> None:
    """Unlinks the shared memory segments of `element`'s arrays now, instead of when the arrays
    are collected (see the module's docstring); the arrays stay valid.

    Grain's arrays (`SharedMemoryArray`) carry their segment (`shm`) and whether they must
    unlink it (the private `_unlink_on_del`, set on the receiving side): cleared here, so the
    segment is unlinked once. Other arrays are left alone.
    """
    for leaf in element.values() if isinstance(element, dict) else (element,):
        owned = isinstance(getattr(leaf, 'shm', None), shared_memory.SharedMemory)
        if owned and getattr(leaf, '_unlink_on_del', False):
            leaf._unlink_on_del = False
            leaf.shm.unlink()
