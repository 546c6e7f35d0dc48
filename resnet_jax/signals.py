"""What a stop signal means to a command: SIGINT (Ctrl-C), SIGTERM and SIGHUP end every command
within seconds, with one line and the shell's exit code for the signal (130, 143, 129).

A signal that arrives while a command works raises `Interrupted` in the main thread, so the
command's closers run (a workdir lock is released, Grain workers are ended) on the way out. The
trainer turns the same signals into a save at the next step once its loop runs
(`resnet_jax.actions.PreemptionWatch`); before that, and during its final evaluation, it
stops like every other command. Handlers are installed explicitly, whatever the command
inherited: a process started in the background (`cmd &`, nohup) inherits SIGINT or SIGHUP
ignored, and would otherwise run to the end through a Ctrl-C or `kill -INT`.

SIGHUP is what a dropped ssh session (`gcloud ... ssh --command`) sends: it means "stop", like
SIGTERM, never "die without saving".
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; raised in the main thread. A KeyboardInterrupt, so that
    `except Exception` clauses on the way out do not swallow it."""

    def __init__(self, signum: int, doing: str = ''):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f'stopped by {name(signum)}' + (f' {doing}' if doing else ''))


_received: list[int] = []  # every stop signal that reached one of our handlers, in order


def note(signum: int) -> None:
    """Records that a stop signal arrived (every handler of ours calls this): a thread waiting
    on something that may never answer (a store) asks `received()` whether to give up."""
    _received.append(signum)


def received() -> int:
    """How many stop signals have arrived so far."""
    return len(_received)


def last_received() -> int:
    return _received[-1] if _received else signal.SIGTERM


def name(signum: int) -> str:
    return signal.Signals(signum).name


def raise_interrupted(signum: int, frame: Any) -> None:
    """The handler of `install`: raises `Interrupted` in the main thread."""
    del frame
    note(signum)
    raise Interrupted(signum)


def install(handler: Callable[[int, Any], Any] = raise_interrupted) -> dict[int, Any]:
    """Sets `handler` (default: raise `Interrupted`) for every stop signal; returns the
    previous handlers. Only the main thread may set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


def restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """Within the block, a stop signal raises `Interrupted` (the handlers before are restored
    after it)."""
    previous = install()
    try:
        yield
    finally:
        restore(previous)
