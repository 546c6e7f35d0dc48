"""One writer per workdir: `WORKDIR/lock.json`, held by the trainer (process 0) while it runs.

A second trainer is refused with one line naming the first; a lock left by a crash is taken over
once its process is gone (same host) or its heartbeat has stopped (any host).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from resnet_jax import paths

logger = logging.getLogger('resnet_jax')

LOCK_FILE = 'lock.json'
_HELD_TOKENS: set[str] = set()  # the locks this process holds now


class WorkdirInUse(ValueError):
    """Another trainer holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class WorkdirLock:
    """`WORKDIR/lock.json`, created exclusively by the one trainer that writes the workdir.

    The file names its owner (host, pid, command, start time) and a background thread touches
    it every `heartbeat_seconds`. A second trainer is refused with one line naming the owner.
    A lock left by a crash is taken over, with a warning, when its owner's process is gone
    (same host) or it has had no heartbeat for `stale_after_seconds` (any host, e.g. a
    preempted VM). `lost` turns True if another process took the lock over meanwhile.

    Exclusive creation is `O_CREAT | O_EXCL` locally (atomic on local filesystems and NFSv3+)
    and a conditional upload on `gs://` (`ifGenerationMatch=0`: of two trainers, one creates
    the object). Taking over a stale lock on an object store is a copy and a delete, not a
    rename: docs/reliability.md says what that leaves open.
    """

    def __init__(
        self,
        workdir: str,
        *,
        heartbeat_seconds: float = 30.0,
        stale_after_seconds: float = 600.0,
        failure_limit_seconds: float = 300.0,
    ):
        self.path = paths.join(workdir, LOCK_FILE)
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_after_seconds = stale_after_seconds
        # Never as long as another trainer waits before it takes a silent lock over.
        self.failure_limit_seconds = min(failure_limit_seconds, stale_after_seconds / 2)
        self._failure: tuple[float, str] | None = None  # (since, what) while the beat fails
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        import sys

        return {
            'host': socket.gethostname(),
            'pid': os.getpid(),
            'token': self.token,
            'started': time.time(),
            'command': ' '.join(sys.argv)[:300],
        }

    def _create(self) -> bool:
        return paths.create_exclusive(self.path, json.dumps(self._record()))

    def _read(self) -> tuple[dict[str, Any], float] | None:
        """(owner record, seconds since its last heartbeat), or None if there is no lock."""
        try:
            age = paths.age_seconds(self.path)
            text = paths.read_text(self.path)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = {}  # being written right now, or damaged: judged by its age alone
        return record if isinstance(record, dict) else {}, age

    def _stale_reason(self, owner: dict[str, Any], age: float) -> str | None:
        pid = owner.get('pid')
        same_host = owner.get('host') == socket.gethostname()
        if same_host and isinstance(pid, int) and not _pid_alive(pid):
            return f'its process {pid} on this host is gone'
        if same_host and pid == os.getpid() and owner.get('token') not in _HELD_TOKENS:
            # A run in this very process (a notebook kernel) that ended without releasing it,
            # e.g. because the store was unreachable: no lock object of ours holds it now.
            return 'an earlier run in this process ended without releasing it'
        if age > self.stale_after_seconds:
            return f'it has had no heartbeat for {age:.0f} s'
        return None

    def _describe(self, owner: dict[str, Any], age: float) -> str:
        started = owner.get('started')
        when = (
            time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))
            if isinstance(started, (int, float))
            else 'an unknown time'
        )
        return (
            f'pid {owner.get("pid", "?")} on host {owner.get("host", "?")}, started {when}, '
            f'last heartbeat {age:.0f} s ago'
        )

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirInUse naming the trainer that holds it."""
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            found = self._read()
            if found is None:
                continue  # released between our attempt and the read: try again
            owner, age = found
            reason = self._stale_reason(owner, age)
            if reason is None:
                raise WorkdirInUse(
                    f'workdir {self.path.rsplit("/", 1)[0]!r} is in use by another trainer '
                    f'({self._describe(owner, age)}; {self.path}). Wait for it to finish or stop '
                    'it, or use another --workdir; a lock left by a crash is taken over '
                    'automatically once its process is gone or after '
                    f'{self.stale_after_seconds:.0f} s without a heartbeat'
                )
            self._take_over(owner, reason)
        raise WorkdirInUse(f'could not take {self.path}: other trainers keep taking it')

    def _take_over(self, owner: dict[str, Any], reason: str) -> None:
        # Move the stale lock aside under a unique name, then check it was the one we judged:
        # of two trainers taking over at once, only one moves it, and a fresh lock created
        # meanwhile by a third is put back.
        aside = f'{self.path}.stale-{self.token}'
        try:
            paths.move(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(paths.read_text(aside))
        except ValueError:
            moved = {}
        if moved.get('token') != owner.get('token'):
            paths.move(aside, self.path)
            return
        paths.remove(aside)
        logger.warning(
            'took over the workdir lock %s of pid %s on host %s: %s',
            self.path,
            owner.get('pid', '?'),
            owner.get('host', '?'),
            reason,
        )

    def _start_heartbeat(self) -> None:
        _HELD_TOKENS.add(self.token)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name='workdir-lock', daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if not self._still_ours():
                    self.lost = True
                    logger.error('the workdir lock %s was taken over by another trainer', self.path)
                    return
                paths.touch(self.path)
            except Exception as e:  # the store: reported by check_heartbeat, in the main thread
                self._failure = self._failure or (time.monotonic(), f'{type(e).__name__}: {e}')
            else:
                self._failure = None

    def check_heartbeat(self) -> None:
        """Raises StorageError once the heartbeat has failed for `failure_limit_seconds` in a
        row (the store cannot be reached): the run stops with one line, in the main thread,
        before another trainer could judge the lock stale and take the workdir over."""
        failure = self._failure
        if failure is not None and time.monotonic() - failure[0] > self.failure_limit_seconds:
            raise paths.StorageError(
                f'could not refresh the workdir lock {self.path} for '
                f'{time.monotonic() - failure[0]:.0f} s: {" ".join(failure[1].split())[:300]}'
            )

    def _still_ours(self) -> bool:
        found = self._read()
        return found is not None and found[0].get('token') == self.token

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still ours."""
        _HELD_TOKENS.discard(self.token)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._still_ours():
            with contextlib.suppress(FileNotFoundError):
                paths.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
