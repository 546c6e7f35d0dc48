"""Workdirs on gs://, against a real GCS JSON API on 127.0.0.1 (fake-gcs-server, started by the
`gcs_bucket` fixture): training, preemption and exact resume, a corrupted checkpoint object,
evaluate and report on the bucket, and the errors of a bucket that is not there.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from test_reliability import TIMEOUT, _env, _smoke, _train_argv

from resnet_jax import checkpoint, lock, paths, trainer, workdir
from resnet_jax.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def _losses(run_dir):
    records = read_metrics(paths.join(str(run_dir), 'metrics.jsonl'))
    return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


def _objects(url):
    fs = paths._fs(url)
    return sorted(p.split('/', 1)[1] for p in fs.find(url))


def _corrupt_object(step_url):
    """Flips one byte in the middle of the largest object of a step: silent bit rot."""
    fs = paths._fs(step_url)
    sizes = {p: fs.size(p) for p in fs.find(step_url)}
    target = max(sizes, key=sizes.get)
    blob = bytearray(fs.cat_file(target))
    blob[len(blob) // 2] ^= 0xFF
    fs.pipe_file(target, bytes(blob))


def test_the_path_layer_on_a_bucket(gcs_bucket):
    run = paths.writable_dir(f'{gcs_bucket}/run/', 'workdir')
    assert run == f'{gcs_bucket}/run'
    assert not paths.exists(f'{run}/config.json') and paths.listdir(run) == []
    paths.write_text(f'{run}/config.json', '{"a": 1}')
    assert paths.read_text(f'{run}/config.json') == '{"a": 1}'
    assert paths.create_exclusive(f'{run}/lock.json', 'mine')
    assert not paths.create_exclusive(f'{run}/lock.json', 'theirs')  # the object-store O_EXCL
    assert paths.read_text(f'{run}/lock.json') == 'mine'
    assert 0 <= paths.age_seconds(f'{run}/lock.json') < 60
    for name in ('s/b', 's/a/x', 's/a/c/z'):
        paths.write_text(f'{run}/{name}', name)
    assert paths.files_under(f'{run}/s') == ['b', 'a/x', 'a/c/z']  # os.walk's order
    paths.move(f'{run}/s', f'{run}/t')
    assert paths.listdir(run) == ['config.json', 'lock.json', 't']
    paths.remove(f'{run}/lock.json')
    with pytest.raises(FileNotFoundError):
        paths.remove(f'{run}/lock.json')


def test_the_workdir_lock_is_exclusive_on_a_bucket(gcs_bucket):
    run = f'{gcs_bucket}/run'
    held = lock.WorkdirLock(run)
    held.acquire()
    with pytest.raises(lock.WorkdirInUse, match=f"workdir '{run}' is in use"):
        lock.WorkdirLock(run).acquire()
    held.release()
    assert not paths.exists(f'{run}/lock.json')  # released


def test_a_run_on_a_bucket_resumes_falls_back_and_reports(
    gcs_bucket, cifar10_data_dir, tmp_path, monkeypatch
):
    """In process: preempted and resumed on gs:// like on local disk; a corrupted object sends
    the run back to the previous checkpoint, moved aside on the bucket; evaluate and report."""
    from resnet_jax import actions, analysis, evaluation, report

    monkeypatch.chdir(tmp_path)  # a 'gs:' folder would appear here if a path went local
    run = {'total_steps': 6, 'log_every_steps': 1, 'checkpoint_every_steps': 3}
    local, remote = tmp_path / 'local', f'{gcs_bucket}/run'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), str(local))

    with monkeypatch.context() as patch:
        patch.setattr(actions.PreemptionWatch, 'reached', lambda self, step, manager: step == 4)
        result = trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), remote)
    assert result == {'preempted_at_step': 4.0}
    assert checkpoint.committed_steps(f'{remote}/checkpoints') == [3, 4]
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), remote)
    assert _losses(remote) == _losses(local)  # the same curve, each step once
    objects = _objects(remote)
    for name in ('config.json', 'metrics.jsonl', 'checkpoints/6/fingerprint.json'):
        assert f'run/{name}' in objects
    assert any(o.startswith('run/tensorboard/events.out.tfevents') for o in objects)
    assert 'run/lock.json' not in objects  # released at the end

    # Bit rot in the newest step: set aside on the bucket, the run continues from step 4.
    _corrupt_object(f'{remote}/checkpoints/6')
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, **{**run, 'total_steps': 8}), remote)
    (aside,) = paths.listdir(f'{remote}/{checkpoint.QUARANTINE_DIR}')
    assert aside.startswith('6-')
    assert checkpoint.committed_steps(f'{remote}/checkpoints')[-1] == 8

    config = workdir.read_config(remote)
    state, run = evaluation.read_train_state(remote, config=config)
    step = run.step
    assert step == int(state.step) == 8
    table, figure = report.write_report(remote, remote)
    assert table == f'{remote}/table.md' and paths.read_text(table).startswith('| ')
    with paths.open_file(figure, 'rb') as f:
        assert f.read(4) == b'\x89PNG'
    csv_path, _ = analysis.write_figure7(remote, remote, split='test[:16]')  # Figure 7 too
    assert paths.read_text(csv_path).startswith('run,model,layer,module,std')
    assert not os.path.exists(tmp_path / 'gs:')


def _wait_for_step_on_bucket(run_dir, step, proc):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f'training ended early: {proc.returncode}'
        if paths.exists(f'{run_dir}/metrics.jsonl') and max(_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f'{run_dir} did not reach step {step}')


def test_the_command_lines_of_a_pod_on_a_bucket(gcs_bucket, cifar10_data_dir, run_process):
    """train.py is preempted (SIGTERM) and rerun, then `python -m resnet_jax evaluate` and
    `python -m resnet_jax report` read the bucket; no 'gs:' folder appears on local disk."""
    remote = f'{gcs_bucket}/run'
    run = {'total_steps': 12, 'log_every_steps': 1, 'checkpoint_every_steps': 1000}
    proc = subprocess.Popen(
        [sys.executable, *_train_argv(remote, cifar10_data_dir, **run)],
        cwd=REPO,
        env=_env(2),  # carries the emulator's client settings from os.environ
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step_on_bucket(remote, 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-2000:]
    saved = int(re.search(r'preempted: saved step (\d+)', out).group(1))
    assert checkpoint.committed_steps(f'{remote}/checkpoints') == [saved] and saved < 12
    before = _losses(remote)

    resumed = run_process(_train_argv(remote, cifar10_data_dir, **run), env=_env(2))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f'resumed from {remote}/checkpoints at step {saved}' in resumed.stderr
    after = _losses(remote)
    assert sorted(after) == list(range(1, 13))  # each step once
    assert {s: after[s] for s in before if s <= saved} == {
        s: v for s, v in before.items() if s <= saved
    }

    evaluated = run_process(
        ['-m', 'resnet_jax', 'evaluate', f'--workdir={remote}', '--split=test[:16]'], env=_env(2)
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert 'test[:16]' in evaluated.stdout + evaluated.stderr
    reported = run_process(['-m', 'resnet_jax', 'report', f'--workdir={remote}'], env=_env(2))
    assert reported.returncode == 0, reported.stderr[-2000:]
    assert f'wrote {remote}/table.md and {remote}/figure6.png' in reported.stdout
    assert not (REPO / 'gs:').exists()


@pytest.mark.parametrize(
    'argv, message',
    [
        (
            ['train.py', '--config=configs/smoke.py', '--workdir=gs://no-such-bucket/run'],
            "error: workdir 'gs://no-such-bucket/run': bucket 'no-such-bucket' does not exist",
        ),
        (
            ['-m', 'resnet_jax', 'evaluate', '--workdir=gs://no-such-bucket/run'],
            'error: gs://no-such-bucket/run/config.json does not exist; expected the workdir',
        ),
        (
            ['-m', 'resnet_jax', 'report', '--workdir=gs://no-such-bucket/run'],
            "error: --workdir 'gs://no-such-bucket/run' is not a directory",
        ),
    ],
    ids=['train', 'evaluate', 'report'],
)
def test_a_bucket_that_does_not_exist_is_one_clear_error(gcs_bucket, run_process, argv, message):
    del gcs_bucket  # the emulator runs; the bucket named on the command line does not exist
    result = run_process(argv, env=_env(1))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(message), result.stderr[-2000:]
    assert not (REPO / 'gs:').exists()


def test_missing_credentials_are_one_clear_error(gcs_bucket, run_process, tmp_path):
    """A client set to use Application Default Credentials that are not there."""
    env = {
        **_env(1),
        'FSSPEC_GS': json.dumps({'token': 'google_default'}),
        'GOOGLE_APPLICATION_CREDENTIALS': str(tmp_path / 'missing-key.json'),
    }
    argv = ['train.py', '--config=configs/smoke.py', f'--workdir={gcs_bucket}/run']
    result = run_process(argv, env=env)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: cannot use '{gcs_bucket}/run': DefaultCredentialsError: File "
            f'{tmp_path / "missing-key.json"} was not found'
        )
    ), result.stderr[-2000:]
    assert paths.listdir(gcs_bucket) == []  # nothing written


def _give_up_quickly(monkeypatch):
    """The clients' retry budgets cut to one attempt: gcsfs retries a dead store for about a
    minute per request and TensorStore (Orbax's arrays) for about fourteen; an outage that
    long ends the same way, later."""
    import gcsfs
    from gcsfs.retry import retry_request
    from orbax.checkpoint._src.serialization import tensorstore_utils

    once = retry_request(retries=1)(gcsfs.GCSFileSystem._request.__wrapped__)
    monkeypatch.setattr(gcsfs.GCSFileSystem, '_request', once)
    quick = {'max_retries': 1, 'initial_delay': '10ms', 'max_delay': '50ms'}
    for context in ('_BASE_TS_CONTEXT', '_DEFAULT_OCDBT_TS_CONTEXT'):
        monkeypatch.setitem(getattr(tensorstore_utils, context), 'gcs_request_retries', quick)


@pytest.mark.slow
def test_the_store_going_away_mid_run_is_one_error_and_the_last_checkpoint_survives(
    cifar10_data_dir, tmp_path, monkeypatch
):
    from gcs_emulator import Emulator, point_clients_at

    store = tmp_path / 'store'  # the emulator's objects outlive its process
    store.mkdir()
    emulator = Emulator(root=str(store))
    try:
        emulator.create_bucket('outage')
        point_clients_at(emulator, monkeypatch)
        _give_up_quickly(monkeypatch)
        remote = 'gs://outage/run'
        run = {'total_steps': 6, 'log_every_steps': 1, 'checkpoint_every_steps': 2}
        real_save = checkpoint.save

        def save_after_the_store_goes(manager, step, *args, **kwargs):
            if step == 4:
                checkpoint.wait(manager)  # step 2 committed and fingerprinted
                emulator.stop()
            return real_save(manager, step, *args, **kwargs)

        monkeypatch.setattr(checkpoint, 'save', save_after_the_store_goes)
        started = time.monotonic()
        with pytest.raises((OSError, RuntimeError)) as failure:
            trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), remote)
        assert time.monotonic() - started < 120
        message = str(failure.value)  # e.g. could not look up gs://outage/run/checkpoints: ...
        assert re.match(r'could not \w+ .*gs://outage/run', message), message
        assert re.search('Cannot connect to host|Connect call failed', message), message
        assert '\n' not in message
        monkeypatch.setattr(checkpoint, 'save', real_save)

        # The store comes back: step 2 is intact, and the run resumes from it.
        emulator = Emulator(root=str(store), port=emulator.port)
        point_clients_at(emulator, monkeypatch)
        assert checkpoint.committed_steps(f'{remote}/checkpoints') == [2]
        assert checkpoint.verify(f'{remote}/checkpoints', 2) is None
        trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), remote)
        assert checkpoint.committed_steps(f'{remote}/checkpoints')[-1] == 6
        assert sorted(_losses(remote)) == [1, 2, 3, 4, 5, 6]
    finally:
        emulator.stop()


def _without_tensorstore_credentials(env):
    """gcsfs reaches the emulator, TensorStore (Orbax's array files) does not: it searches for
    Application Default Credentials and tries the real storage.googleapis.com, which this
    machine cannot reach. Before, the run hung at its first save for over 10 minutes, silent,
    and SIGTERM did not end it."""
    env = dict(env)
    for name in ('TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING'):
        env.pop(name, None)
    return env


@pytest.mark.slow
def test_a_store_tensorstore_cannot_use_stops_the_run_within_the_storage_timeout(
    gcs_bucket, cifar10_data_dir
):
    argv = [
        sys.executable,
        *_train_argv(f'{gcs_bucket}/run', cifar10_data_dir),
        '--config.storage_timeout_seconds=15',
    ]
    env = _without_tensorstore_credentials(_env(2))
    started = time.monotonic()
    result = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr[-3000:]
    assert 'the store did not answer within 15 s (storage_timeout_seconds)' in errors[0]
    assert 'no checkpoint is complete yet, and nothing was overwritten' in errors[0]
    assert 'Traceback' not in result.stderr
    # Set-up and compilation, then the first save's 15 s and the next save's 15 s at most.
    assert took < 150, took
    assert checkpoint.committed_steps(f'{gcs_bucket}/run/checkpoints') == []
    assert not paths.exists(f'{gcs_bucket}/run/lock.json')  # released on the way out

    # SIGTERM while the save waits on the store: honoured within seconds, with one line.
    proc = subprocess.Popen(
        [*argv[:-1], '--config.storage_timeout_seconds=600', '--config.total_steps=10000'],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while 'step 4/' not in _stderr_so_far(proc):  # past the first save, which now hangs
        assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(5)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 20
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.match(
        r'error: could not save checkpoint step \d+ to .*: stopped by SIGTERM while', last
    )


_SEEN: dict[int, str] = {}


def _stderr_so_far(proc):
    """What `proc` has written to stderr so far (one line at a time, blocking for each)."""
    line = proc.stderr.readline()
    _SEEN[proc.pid] = _SEEN.get(proc.pid, '') + line
    return _SEEN[proc.pid]
