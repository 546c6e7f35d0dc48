"""Tests of resnet_jax.lock: one writer per workdir, stale locks taken over, the heartbeat."""

import json
import logging
import os
import socket
import time

import pytest

from resnet_jax import lock as lock_lib


def _foreign_lock(path, *, host, pid, age_seconds=0.0):
    path.write_text(json.dumps({'host': host, 'pid': pid, 'token': 'theirs', 'started': 0}))
    then = time.time() - age_seconds
    os.utime(path, (then, then))


def test_one_lock_per_workdir_and_the_second_names_the_first(tmp_path):
    first = lock_lib.WorkdirLock(str(tmp_path))
    first.acquire()
    record = json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())
    assert record['pid'] == os.getpid() and record['host'] == socket.gethostname()
    with pytest.raises(
        lock_lib.WorkdirInUse, match=rf'in use by another trainer \(pid {os.getpid()}'
    ):
        lock_lib.WorkdirLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / lock_lib.LOCK_FILE).exists()
    with lock_lib.WorkdirLock(str(tmp_path)):  # free again
        assert (tmp_path / lock_lib.LOCK_FILE).exists()
    assert not (tmp_path / lock_lib.LOCK_FILE).exists()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog, run_process):
    caplog.set_level(logging.WARNING, logger='resnet_jax')
    pid = int(run_process(['-c', 'import os; print(os.getpid())']).stdout)  # gone now
    _foreign_lock(tmp_path / lock_lib.LOCK_FILE, host=socket.gethostname(), pid=pid)
    with lock_lib.WorkdirLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())['token'] == lock.token
    assert f'its process {pid} on this host is gone' in caplog.text
    assert not list(tmp_path.glob('*.stale-*'))


def test_a_lock_of_another_host_is_stale_only_without_heartbeats(tmp_path):
    lock_file = tmp_path / lock_lib.LOCK_FILE
    _foreign_lock(lock_file, host='other-vm', pid=1, age_seconds=60)
    with pytest.raises(lock_lib.WorkdirInUse, match=r'pid 1 on host other-vm.*heartbeat 60 s ago'):
        lock_lib.WorkdirLock(str(tmp_path), stale_after_seconds=600).acquire()
    assert json.loads(lock_file.read_text())['token'] == 'theirs'  # untouched
    _foreign_lock(lock_file, host='other-vm', pid=1, age_seconds=700)
    with lock_lib.WorkdirLock(str(tmp_path), stale_after_seconds=600) as lock:
        assert json.loads(lock_file.read_text())['token'] == lock.token


def test_the_heartbeat_refreshes_the_lock_and_notices_a_take_over(tmp_path):
    lock = lock_lib.WorkdirLock(str(tmp_path), heartbeat_seconds=0.05)
    lock.acquire()
    lock_file = tmp_path / lock_lib.LOCK_FILE
    os.utime(lock_file, (0, 0))
    deadline = time.monotonic() + 10
    while os.stat(lock_file).st_mtime == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.stat(lock_file).st_mtime > 0  # touched by the heartbeat
    assert not lock.lost
    _foreign_lock(lock_file, host='other-vm', pid=1)  # as a trainer that judged it stale
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.lost
    lock.release()
    assert json.loads(lock_file.read_text())['token'] == 'theirs'  # not ours to remove


def test_a_heartbeat_the_store_refuses_is_one_error_in_the_main_thread(tmp_path, monkeypatch):
    """Before, a store gone away made the heartbeat thread die with a 100-line traceback."""
    from resnet_jax import paths

    lock = lock_lib.WorkdirLock(str(tmp_path), heartbeat_seconds=0.02, failure_limit_seconds=0.2)
    lock.acquire()
    crashed = []
    monkeypatch.setattr('threading.excepthook', lambda args: crashed.append(args))

    def unreachable(path):
        raise paths.StorageError(f'could not read {path}: ClientConnectorError: no route')

    monkeypatch.setattr(paths, 'read_text', unreachable)
    lock.check_heartbeat()  # failing for less than the limit: not yet
    time.sleep(0.5)
    with pytest.raises(paths.StorageError, match=r'could not refresh the workdir lock .* for'):
        lock.check_heartbeat()
    assert not crashed and lock._thread.is_alive()  # it keeps trying, silently
    monkeypatch.undo()
    time.sleep(0.1)
    lock.check_heartbeat()  # the store is back
    lock.release()
    assert not (tmp_path / lock_lib.LOCK_FILE).exists()
