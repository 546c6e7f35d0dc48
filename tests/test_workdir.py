"""Tests of resnet_jax.workdir: one writer per workdir, the recorded config, run identities."""

import json
import logging
import os
import socket
import time

import pytest

from configs import smoke
from resnet_jax import config as config_lib
from resnet_jax import trainer, workdir


def _foreign_lock(path, *, host, pid, age_seconds=0.0):
    path.write_text(json.dumps({'host': host, 'pid': pid, 'token': 'theirs', 'started': 0}))
    then = time.time() - age_seconds
    os.utime(path, (then, then))


def test_one_lock_per_workdir_and_the_second_names_the_first(tmp_path):
    first = workdir.WorkdirLock(str(tmp_path))
    first.acquire()
    record = json.loads((tmp_path / workdir.LOCK_FILE).read_text())
    assert record['pid'] == os.getpid() and record['host'] == socket.gethostname()
    with pytest.raises(
        workdir.WorkdirInUse, match=rf'in use by another trainer \(pid {os.getpid()}'
    ):
        workdir.WorkdirLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / workdir.LOCK_FILE).exists()
    with workdir.WorkdirLock(str(tmp_path)):  # free again
        assert (tmp_path / workdir.LOCK_FILE).exists()
    assert not (tmp_path / workdir.LOCK_FILE).exists()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog, run_process):
    caplog.set_level(logging.WARNING, logger='resnet_jax')
    pid = int(run_process(['-c', 'import os; print(os.getpid())']).stdout)  # gone now
    _foreign_lock(tmp_path / workdir.LOCK_FILE, host=socket.gethostname(), pid=pid)
    with workdir.WorkdirLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())['token'] == lock.token
    assert f'its process {pid} on this host is gone' in caplog.text
    assert not list(tmp_path.glob('*.stale-*'))


def test_a_lock_of_another_host_is_stale_only_without_heartbeats(tmp_path):
    lock_file = tmp_path / workdir.LOCK_FILE
    _foreign_lock(lock_file, host='other-vm', pid=1, age_seconds=60)
    with pytest.raises(workdir.WorkdirInUse, match=r'pid 1 on host other-vm.*heartbeat 60 s ago'):
        workdir.WorkdirLock(str(tmp_path), stale_after_seconds=600).acquire()
    assert json.loads(lock_file.read_text())['token'] == 'theirs'  # untouched
    _foreign_lock(lock_file, host='other-vm', pid=1, age_seconds=700)
    with workdir.WorkdirLock(str(tmp_path), stale_after_seconds=600) as lock:
        assert json.loads(lock_file.read_text())['token'] == lock.token


def test_the_heartbeat_refreshes_the_lock_and_notices_a_take_over(tmp_path):
    lock = workdir.WorkdirLock(str(tmp_path), heartbeat_seconds=0.05)
    lock.acquire()
    lock_file = tmp_path / workdir.LOCK_FILE
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


def test_the_recorded_config_is_a_config_file_for_config_flags(tmp_path):
    config = smoke.get_config()
    config_lib.apply_overrides(config, {'optimizer.learning_rate': 0.05, 'model.name': 'plain20'})
    (tmp_path / workdir.CONFIG_FILE).write_text(workdir.config_json(config))
    again = workdir.get_config(str(tmp_path))
    assert again.to_dict() == config.to_dict()  # tuples come back as tuples
    assert again.model.name == 'plain20' and again.optimizer.learning_rate == 0.05
    with pytest.raises(ValueError, match=r'config.json does not exist; expected the workdir'):
        workdir.read_config(str(tmp_path / 'nothing'))
    (tmp_path / workdir.CONFIG_FILE).write_text('{"step": 1')
    with pytest.raises(ValueError, match=r'config.json is not a readable config'):
        workdir.read_config(str(tmp_path))


def test_identity_tells_same_shaped_networks_apart():
    def identity(**overrides):
        config = smoke.get_config()
        config_lib.apply_overrides(config, overrides)
        return workdir.identity(config, config_lib.create_model_from_config(config, 10))

    base = identity()
    assert base['model.name'] == 'resnet20' and base['model.shortcut'] == 'A'
    assert base == identity(**{'model.shortcut': 'A'})  # the default, spelled out
    assert base == identity(**{'optimizer.learning_rate': 0.01, 'dtype': 'bfloat16'})
    plain = identity(**{'model.name': 'plain20'})  # resnet20's shapes exactly
    with pytest.raises(ValueError, match=r"model.name='resnet20' \(this config: 'plain20'\)"):
        workdir.check_identity(base, plain, 'checkpoint step 3')
    with pytest.raises(ValueError, match=r"dataset.normalization='pixel_mean'"):
        workdir.check_identity(base, identity(**{'dataset.normalization': 'channel'}), 'x')
    with pytest.raises(ValueError, match=r'model.bn_epsilon'):
        workdir.check_identity(base, identity(**{'model.bn_epsilon': 1e-3}), 'x')


@pytest.mark.parametrize('url', ['s3://bucket/run', 'az://container/run'])
def test_an_unsupported_storage_url_is_refused_and_no_local_folder_appears(
    tmp_path, monkeypatch, url
):
    """os.makedirs would make ./s3:/bucket/run; gs:// works (tests/test_gcs.py), others stop
    before anything is read or written."""
    monkeypatch.chdir(tmp_path)
    config = smoke.get_config()
    config_lib.apply_overrides(config, {'dataset.data_dir': str(tmp_path)})
    expected = rf"workdir '{url}': \w+:// is not supported; expected a local path or gs://"
    with pytest.raises(ValueError, match=expected):
        trainer.train_and_evaluate(config, url)
    with pytest.raises(ValueError, match=expected):
        workdir.read_config(url)
    assert list(tmp_path.iterdir()) == []
