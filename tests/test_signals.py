"""Stop signals (resnet_jax.signals): every command ends within seconds on SIGINT, SIGTERM or
SIGHUP, with one line and the shell's exit code; the trainer saves instead once its loop runs.

Commands run as subprocesses, as users start them: also with SIGINT inherited as ignored, as a
shell starts a command in the background (`cmd &`), where Python would otherwise never raise
KeyboardInterrupt.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from resnet_jax import checkpoint, signals

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300


def _start(argv, *, inherit_ignored=()):
    """The command as a shell starts it; `inherit_ignored` signals ignored as it starts (what a
    shell's `trap '' SIG` before `exec` does: no fork-time Python code in this threaded test)."""
    traps = ''.join(f"trap '' {signal.Signals(s).name[3:]}; " for s in inherit_ignored)
    return subprocess.Popen(
        ['sh', '-c', f'{traps}exec "$0" "$@"', sys.executable, *argv],
        cwd=REPO,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc, signum, within=20.0):
    """Sends `signum`; returns (exit code, stdout, stderr, seconds it took to end)."""
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f'still running {within} s after {signals.name(signum)}: {err[-2000:]}')
    return proc.returncode, out, err, time.monotonic() - sent


def test_interrupted_names_the_signal_and_carries_the_shells_exit_code():
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        error = signals.Interrupted(signum, 'before the first step')
        assert isinstance(error, KeyboardInterrupt)
        assert error.exit_code == code
        assert str(error) == f'stopped by {signals.name(signum)} before the first step'


@pytest.fixture(scope='module')
def trained(tmp_path_factory, cifar10_data_dir):
    run = tmp_path_factory.mktemp('signals') / 'run'
    proc = _start(
        [
            'train.py',
            '--config=configs/smoke.py',
            f'--workdir={run}',
            f'--config.dataset.data_dir={cifar10_data_dir}',
            '--config.total_steps=3',
        ]
    )
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-2000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    'signum, ignored, code, protocol',
    [
        (signal.SIGINT, (signal.SIGINT,), 130, ()),  # Ctrl-C of a command started with `&`
        (signal.SIGINT, (signal.SIGINT,), 130, ('--crops=10',)),
        (signal.SIGTERM, (), 143, ()),
        (signal.SIGHUP, (signal.SIGHUP,), 129, ()),  # a dropped ssh session, nohup'd or not
    ],
    ids=['sigint-inherited-ignored', 'sigint-10-crop', 'sigterm', 'sighup-inherited-ignored'],
)
def test_evaluate_stops_within_seconds_with_one_line(signum, ignored, code, protocol, trained):
    """Before, evaluate over the train split ignored Ctrl-C and ran to the end, exit 0."""
    before = {p: p.read_bytes() for p in trained.rglob('*') if p.is_file()}
    proc = _start(
        ['-m', 'resnet_jax', 'evaluate', f'--workdir={trained}', '--split=train', *protocol],
        inherit_ignored=ignored,
    )
    time.sleep(12)  # well into the evaluation of 50,000 images, which takes minutes here
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    returncode, _, err, took = _stop(proc, signum)
    assert returncode == code, err[-2000:]
    lines = [line for line in err.strip().splitlines() if ' WARNING ' not in line]
    assert lines == [f'error: stopped by {signals.name(signum)}'], err[-2000:]
    assert took < 10
    assert {p: p.read_bytes() for p in trained.rglob('*') if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_right_after_the_lock_is_taken_stops_with_one_line_and_no_lock(
    signum, code, tmp_path, cifar10_data_dir
):
    """Before, SIGTERM in the first seconds after the lock was taken exited 143 with no
    message and left the lock behind."""
    run = tmp_path / 'run'
    proc = _start(
        [
            'train.py',
            '--config=configs/smoke.py',
            f'--workdir={run}',
            f'--config.dataset.data_dir={cifar10_data_dir}',
        ]
    )
    deadline = time.monotonic() + TIMEOUT
    while not (run / 'lock.json').exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.002)
    returncode, _, err, _ = _stop(proc, signum)
    assert returncode == code, err[-2000:]
    assert err.strip().splitlines() == [
        f'error: stopped by {signals.name(signum)} before the first step; rerun to start'
    ]
    assert not run.exists()  # no lock, no record: the new workdir is gone again


@pytest.mark.slow
def test_sighup_during_training_saves_the_step_like_sigterm(tmp_path, cifar10_data_dir):
    run = tmp_path / 'run'
    proc = _start(
        [
            'train.py',
            '--config=configs/smoke.py',
            f'--workdir={run}',
            f'--config.dataset.data_dir={cifar10_data_dir}',
            '--config.total_steps=10000',
            '--config.log_every_steps=1',
        ]
    )
    metrics = run / 'metrics.jsonl'
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and metrics.read_text().count('train/loss') >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    returncode, out, err, _ = _stop(proc, signal.SIGHUP, within=120)
    assert returncode == 0, err[-2000:]
    assert 'got SIGHUP: stopping at the next step and saving it' in err
    saved = int(out.split('preempted: saved step ')[1].split(';')[0])
    assert checkpoint.committed_steps(str(run / 'checkpoints'))[-1] == saved
    assert not (run / 'lock.json').exists()
