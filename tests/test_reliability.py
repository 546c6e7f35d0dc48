"""Reliability: preemption with exact resume, crashes mid-save, corrupt checkpoints, other
topologies, several processes, dead peers, non-finite steps and bad input.

Signals and multi-process runs go through real `train.py` processes (and
scripts/launch_local.py); the rest calls the trainer in-process. Every subprocess is bounded.
"""

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from synthetic_data import synthetic_source

from configs import smoke
from resnet_jax import actions, checkpoint, evaluation, preprocessing, sources, steps, trainer
from resnet_jax import config as config_lib
from resnet_jax import workdir as workdir_lib
from resnet_jax.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'scripts' / 'launch_local.py'
TIMEOUT = 300  # seconds any one subprocess may take


def _flags(data_dir, **overrides):
    values = {'dataset.data_dir': str(data_dir), **overrides}
    return [f'--config.{k}={v}' for k, v in values.items()]


def _train_argv(workdir, data_dir, **overrides):
    return [
        'train.py',
        '--config=configs/smoke.py',
        f'--workdir={workdir}',
        *_flags(data_dir, **overrides),
    ]


def _env(devices):
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
    flags.append(f'--xla_force_host_platform_device_count={devices}')
    return {**os.environ, 'XLA_FLAGS': ' '.join(flags), 'JAX_PLATFORMS': 'cpu'}


def _train(workdir, data_dir, devices=8, **overrides):
    return subprocess.run(
        [sys.executable, *_train_argv(workdir, data_dir, **overrides)],
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _launch(workdir, data_dir, processes=2, devices=2, **overrides):
    argv = [
        sys.executable,
        str(LAUNCH),
        f'--num_processes={processes}',
        f'--devices_per_process={devices}',
        f'--timeout_seconds={TIMEOUT}',
        '--',
        *_train_argv(workdir, data_dir, **overrides),
    ]
    return subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _losses(workdir):
    return {
        r['step']: r['train/loss']
        for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
        if 'train/loss' in r
    }


def _wait_for_step(workdir, step, proc, timeout=TIMEOUT):
    """Blocks until `workdir` has logged training step >= `step`."""
    deadline = time.monotonic() + timeout
    path = os.path.join(workdir, 'metrics.jsonl')
    while time.monotonic() < deadline:
        assert proc.poll() is None, f'training ended early: {proc.returncode}'
        if os.path.exists(path) and max(_losses(workdir), default=0) >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f'{workdir} did not reach step {step}')


def _params(workdir, data_dir, step=None):
    config = smoke.get_config()
    with config.unlocked():
        config.dataset.data_dir = str(data_dir)
    state, _ = evaluation.read_train_state(str(workdir), step=step, config=config)
    return jax.device_get(state.params)


def _assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)


# Exact resume needs many steps between the signal and the end: log every step, save rarely.
RESUME = {'total_steps': 30, 'log_every_steps': 1, 'eval_every_steps': 30}
RESUME['checkpoint_every_steps'] = 1000


@pytest.mark.slow
def test_sigterm_saves_at_a_step_exits_0_and_the_resumed_run_is_exact(tmp_path, cifar10_data_dir):
    straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
    assert _train(straight, cifar10_data_dir, **RESUME).returncode == 0

    proc = subprocess.Popen(
        [sys.executable, *_train_argv(interrupted, cifar10_data_dir, **RESUME)],
        cwd=REPO,
        env=_env(8),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(interrupted, 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-2000:]
    saved = int(re.search(r'preempted: saved step (\d+)', out).group(1))
    assert 4 <= saved < RESUME['total_steps']
    assert checkpoint.committed_steps(str(interrupted / 'checkpoints')) == [saved]
    assert max(_losses(interrupted)) == saved

    resumed = _train(interrupted, cifar10_data_dir, **RESUME)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f'resumed from {interrupted / "checkpoints"} at step {saved}' in resumed.stderr
    # Identical losses at every step (after the resume too) and bitwise identical parameters:
    # the data position, the RNG and the optimizer state all came back.
    assert _losses(interrupted) == _losses(straight)
    _assert_bitwise_equal(
        _params(interrupted, cifar10_data_dir), _params(straight, cifar10_data_dir)
    )


@pytest.mark.slow
def test_a_preempted_exit_code_tells_a_batch_script_to_requeue(tmp_path, cifar10_data_dir):
    """--preempted_exit_code=75: the save and the line of a preemption, then status 75
    (scripts/slurm_train.sbatch requeues on it); a finished run still exits 0."""
    run = tmp_path / 'run'
    argv = [*_train_argv(run, cifar10_data_dir, **RESUME), '--preempted_exit_code=75']
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO,
        env=_env(8),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 75, err[-2000:]
    saved = int(re.search(r'preempted: saved step (\d+)', out).group(1))
    assert checkpoint.committed_steps(str(run / 'checkpoints')) == [saved]
    finished = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=_env(8), capture_output=True, timeout=TIMEOUT
    )
    assert finished.returncode == 0, finished.stderr[-2000:]


@pytest.mark.parametrize('code', ['1', '126'])
def test_a_preempted_exit_code_of_an_error_or_the_shell_is_refused(tmp_path, code, run_process):
    result = run_process(
        ['train.py', f'--workdir={tmp_path / "run"}', f'--preempted_exit_code={code}']
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'error: flag --preempted_exit_code={code}: expected 0 or 3..125 (1 and 2 are errors, '
        "126 and up the shell's)"
    ]
    assert not (tmp_path / 'run').exists()


def _pids(launcher_lines):
    return [
        int(m.group(1)) for m in re.finditer(r'\[launch\] process \d+ pid (\d+)', launcher_lines)
    ]


def _read_until_pids(proc, count):
    lines = ''
    while len(_pids(lines)) < count:
        line = proc.stdout.readline()
        assert line, lines
        lines += line
    return _pids(lines), lines


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_exactly_after_sigterm(tmp_path, cifar10_data_dir):
    """2 processes x 2 devices == 1 process x 4 devices; SIGTERM to one, then exact resume."""
    # Two topologies sum the gradient all-reduce in different orders: float32 rounding that an
    # unstable run (learning rate 0.01 on batches of 16) amplifies to 1% by step 4 on some
    # CPUs. At 0.001 the runs stay within 5e-5 of each other; a wrong batch would move the loss
    # by several percent.
    run = {**RESUME, 'total_steps': 12, 'optimizer.learning_rate': 0.001}
    two, one, interrupted = tmp_path / 'two', tmp_path / 'one', tmp_path / 'interrupted'

    launcher = _launch(two, cifar10_data_dir, **run)
    out, _ = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 0, out[-3000:]
    assert _train(one, cifar10_data_dir, devices=4, **run).returncode == 0
    a, b = _losses(two), _losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-3)
    # Only process 0 wrote logs: one record per logged step, one TensorBoard file.
    steps_logged = [r['step'] for r in read_metrics(two / 'metrics.jsonl') if 'train/loss' in r]
    assert steps_logged == list(range(1, 13))
    assert len(os.listdir(two / 'tensorboard')) == 1
    # The checkpoint was written once, is committed and fingerprinted.
    assert checkpoint.committed_steps(str(two / 'checkpoints')) == [12]
    assert checkpoint.verify(str(two / 'checkpoints'), 12) is None
    assert checkpoint.has_fingerprint(str(two / 'checkpoints'), 12)

    # SIGTERM to process 1 only, as when one host of a pod is preempted: both processes agree
    # on a step, save it, and exit 0.
    launcher = _launch(interrupted, cifar10_data_dir, **run)
    pids, head = _read_until_pids(launcher, 2)
    _wait_for_step(interrupted, 3, launcher)
    os.kill(pids[1], signal.SIGTERM)
    out, _ = launcher.communicate(timeout=TIMEOUT)
    out = head + out
    assert launcher.returncode == 0, out[-3000:]
    saved = {int(s) for s in re.findall(r'preempted: saved step (\d+)', out)}
    assert len(saved) == 1, out[-3000:]  # both processes name the same step
    (saved,) = saved
    assert 3 <= saved < 12
    assert checkpoint.committed_steps(str(interrupted / 'checkpoints')) == [saved]

    launcher = _launch(interrupted, cifar10_data_dir, **run)
    out, _ = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 0, out[-3000:]
    assert _losses(interrupted) == _losses(two)
    _assert_bitwise_equal(_params(interrupted, cifar10_data_dir), _params(two, cifar10_data_dir))

    # 2 processes -> 1: the 2-process checkpoint continues training on one process.
    more = _train(two, cifar10_data_dir, devices=1, **{**run, 'total_steps': 14})
    assert more.returncode == 0, more.stderr[-2000:]
    assert max(_losses(two)) == 14


@pytest.mark.slow
def test_a_dead_peer_stops_the_others_within_the_heartbeat_timeout(tmp_path, cifar10_data_dir):
    heartbeat = 10
    launcher = _launch(
        tmp_path / 'run',
        cifar10_data_dir,
        total_steps=10_000,
        log_every_steps=1,
        **{'distributed.heartbeat_timeout_seconds': heartbeat},
    )
    pids, head = _read_until_pids(launcher, 2)
    _wait_for_step(tmp_path / 'run', 3, launcher)
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    out, _ = launcher.communicate(timeout=TIMEOUT)
    stopped_after = time.monotonic() - killed
    out = head + out
    codes = json.loads(re.search(r'\[launch\] exit codes: (\[.*\])', out).group(1))
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0  # process 0 failed...
    assert 'did not stop after a peer failed' not in out  # ...by itself, not killed by us
    assert stopped_after < heartbeat + 30, out[-3000:]
    assert 'a peer has most likely died' in out or 'another task died' in out, out[-3000:]


def _start(workdir, data_dir, **overrides):
    return subprocess.Popen(
        [sys.executable, *_train_argv(workdir, data_dir, **overrides)],
        cwd=REPO,
        env=_env(8),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


LONG_RUN = {
    'total_steps': 10_000,
    'log_every_steps': 1,
    'checkpoint_every_steps': 1000,
    'eval_every_steps': 10_000,
}


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_workdir_is_refused_with_one_line(tmp_path, cifar10_data_dir):
    workdir = tmp_path / 'run'
    first = _start(workdir, cifar10_data_dir, **LONG_RUN)
    _wait_for_step(workdir, 2, first)
    config = (workdir / 'config.json').read_text()
    second = _train(workdir, cifar10_data_dir, **LONG_RUN, **{'optimizer.learning_rate': 0.5})
    assert second.returncode == 1
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"error: workdir '{workdir}' is in use by another trainer (pid ")
    assert f'pid {first.pid} on host ' in line
    assert (workdir / 'config.json').read_text() == config  # the first run's, untouched
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, err[-2000:]
    steps_logged = [r['step'] for r in read_metrics(workdir / 'metrics.jsonl') if 'train/loss' in r]
    assert steps_logged == sorted(set(steps_logged))  # one writer: each step once

    # Started at the same moment: one trains, the other stops at once with the same line.
    both = tmp_path / 'both'
    procs = [_start(both, cifar10_data_dir, **LONG_RUN) for _ in range(2)]
    deadline = time.monotonic() + TIMEOUT
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    (refused,) = [p for p in procs if p.poll() is not None]
    (running,) = [p for p in procs if p is not refused]
    _, err = refused.communicate(timeout=TIMEOUT)
    assert refused.returncode == 1
    (line,) = err.strip().splitlines()
    assert f'is in use by another trainer (pid {running.pid} ' in line
    _wait_for_step(both, 1, running)
    running.send_signal(signal.SIGTERM)
    _, err = running.communicate(timeout=TIMEOUT)
    assert running.returncode == 0, err[-2000:]


@pytest.mark.slow
def test_sigkill_mid_save_leaves_the_previous_checkpoint_usable(tmp_path, cifar10_data_dir):
    workdir = tmp_path / 'run'
    directory = workdir / 'checkpoints'
    proc = subprocess.Popen(
        [
            sys.executable,
            *_train_argv(
                workdir,
                cifar10_data_dir,
                total_steps=10_000,
                log_every_steps=1,
                checkpoint_every_steps=1,  # a save is in flight most of the time
                eval_every_steps=10_000,
            ),
        ],
        cwd=REPO,
        env=_env(8),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_step(workdir, 6, proc)
    proc.kill()
    proc.wait(timeout=60)
    committed = checkpoint.committed_steps(str(directory))
    assert committed
    # What a kill in the middle of a save leaves: a step folder without its commit marker,
    # newer than every committed one. Make sure there is one, whatever the kill hit.
    partial = directory / str(committed[-1] + 50)
    shutil.copytree(directory / str(committed[-1]), partial)
    (partial / 'commit_success.txt').unlink()
    assert checkpoint.latest_step(str(directory)) == committed[-1]

    result = _train(
        workdir,
        cifar10_data_dir,
        total_steps=committed[-1] + 2,
        log_every_steps=1,
        checkpoint_every_steps=1,
        eval_every_steps=10_000,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'at step {committed[-1]}' in result.stderr  # resumed from the last committed step
    assert not partial.exists()  # the leftover was cleaned, not restored
    assert checkpoint.latest_step(str(directory)) == committed[-1] + 2


# As in the two-process test: a learning rate at which rounding differences between
# topologies stay far below the 1e-3 the comparison allows.
TOPOLOGY_RUN = {'log_every_steps': 1, 'optimizer.learning_rate': 0.001}


@pytest.fixture(scope='module')
def eight_device_runs(tmp_path_factory, cifar10_data_dir):
    """An uninterrupted 8-device run, and one stopped (checkpointed) at step 3."""
    root = tmp_path_factory.mktemp('eight')
    assert _train(root / 'straight', cifar10_data_dir, **TOPOLOGY_RUN).returncode == 0
    stopped = _train(root / 'stopped', cifar10_data_dir, total_steps=3, **TOPOLOGY_RUN)
    assert stopped.returncode == 0
    return root / 'straight', root / 'stopped'


@pytest.mark.slow
@pytest.mark.parametrize('devices', [4, 2, 1])
def test_a_checkpoint_of_8_devices_continues_on_fewer(
    devices, eight_device_runs, tmp_path, cifar10_data_dir
):
    straight, stopped = eight_device_runs
    moved = tmp_path / 'moved'
    shutil.copytree(stopped, moved)
    result = _train(moved, cifar10_data_dir, devices=devices, **TOPOLOGY_RUN)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'at step 3' in result.stderr
    a, b = _losses(moved), _losses(straight)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    # The same global batches in the same order: the curve continues where it left off.
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-3)


# --- In-process: corruption, non-finite steps, bad input ------------------------------------


def _smoke(data_dir, **overrides):
    config = smoke.get_config()
    config_lib.apply_overrides(config, {'dataset.data_dir': str(data_dir), **overrides})
    return config


def _corrupt(step_dir):
    """Flips one byte in the middle of the largest file of a step: silent bit rot."""
    files = [p for p in pathlib.Path(step_dir).rglob('*') if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))


def test_a_corrupt_checkpoint_is_set_aside_and_the_previous_one_used(
    tmp_path, cifar10_data_dir, caplog
):
    caplog.set_level(logging.INFO, logger='resnet_jax')
    workdir = tmp_path / 'run'
    directory = workdir / 'checkpoints'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(workdir))
    assert checkpoint.committed_steps(str(directory)) == [3, 6]
    assert checkpoint.verify(str(directory), 6) is None
    _corrupt(directory / '6')
    assert 'do not match the fingerprint' in checkpoint.verify(str(directory), 6)

    trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=9), str(workdir))
    assert 'checkpoint step 6 is bad' in caplog.text
    assert 'resumed from' in caplog.text and 'at step 3' in caplog.text
    (kept,) = os.listdir(workdir / checkpoint.QUARANTINE_DIR)  # moved, never deleted
    assert kept.startswith('6-')
    assert checkpoint.committed_steps(str(directory)) == [3, 6, 9]  # 6 retrained from 3
    assert all(checkpoint.verify(str(directory), s) is None for s in (3, 6, 9))

    # No good checkpoint left: one clear error; nothing is deleted.
    for step in (3, 6, 9):
        _corrupt(directory / str(step))
    with pytest.raises(ValueError, match=r'no usable checkpoint in .*step 9 is bad.*step 3 is bad'):
        trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=12), str(workdir))
    assert len(os.listdir(workdir / checkpoint.QUARANTINE_DIR)) == 4


def _records_without_timing(workdir):
    return [
        {k: v for k, v in r.items() if k != 'train/images_per_sec'}
        for r in read_metrics(workdir / 'metrics.jsonl')
    ]


@pytest.mark.slow
def test_metrics_after_any_interruption_equal_an_uninterrupted_runs(
    tmp_path, cifar10_data_dir, monkeypatch
):
    """Preempted between two log lines, killed after writing records its checkpoint never
    held, rerun when finished: metrics.jsonl ends with each step once, as without it all."""
    run = {
        'total_steps': 10,
        'log_every_steps': 4,
        'eval_every_steps': 5,
        'checkpoint_every_steps': 3,
        'dataset.test_split': 'test[:40]',
    }
    straight, preempted, killed = tmp_path / 'straight', tmp_path / 'preempted', tmp_path / 'killed'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), str(straight))
    expected = _records_without_timing(straight)
    assert [r['step'] for r in expected] == [4, 5, 8, 10, 10, 10]  # train, eval, train, +test

    # Preempted at step 6: steps 5 and 6 are not logged yet; their metrics ride in the
    # checkpoint, so the line at step 8 averages 5..8 as it does without the interruption.
    with monkeypatch.context() as patch:
        patch.setattr(actions.PreemptionWatch, 'reached', lambda self, step, manager: step == 6)
        assert trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), str(preempted)) == {
            'preempted_at_step': 6.0
        }
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), str(preempted))
    assert _records_without_timing(preempted) == expected

    # Killed when the records of steps 8-10 were written but their checkpoints were not:
    # resumed from step 6, the run writes them again, once.
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), str(killed))
    for step in (9, 10):
        shutil.rmtree(killed / 'checkpoints' / str(step))
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), str(killed))
    assert _records_without_timing(killed) == expected

    # Rerunning a finished run adds nothing.
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, **run), str(straight))
    assert _records_without_timing(straight) == expected


def _poison_step(at_step):
    """Wraps make_train_step so the images of one step are NaN (a stand-in for divergence)."""
    original = steps.make_train_step

    def make(*args, **kwargs):
        step_fn = original(*args, **kwargs)

        def poisoned(state, batch):
            image = jax.numpy.where(state.step + 1 == at_step, jax.numpy.nan, batch['image'])
            return step_fn(state, {**batch, 'image': image})

        return poisoned

    return make


def test_a_non_finite_step_stops_the_run_and_is_never_saved(
    tmp_path, cifar10_data_dir, monkeypatch
):
    monkeypatch.setattr(steps, 'make_train_step', _poison_step(5))
    workdir = tmp_path / 'run'
    with pytest.raises(FloatingPointError) as e:
        trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(workdir))
    assert 'not finite at step 5' in str(e.value)
    assert 'The last checkpoint is step 3' in str(e.value)
    assert checkpoint.committed_steps(str(workdir / 'checkpoints')) == [3]
    params = _params(workdir, cifar10_data_dir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nonfinite_skip_keeps_the_state_counts_and_bounds_the_skips(
    tmp_path, cifar10_data_dir, monkeypatch
):
    monkeypatch.setattr(steps, 'make_train_step', _poison_step(5))
    workdir = tmp_path / 'run'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, nonfinite='skip'), str(workdir))
    records = read_metrics(workdir / 'metrics.jsonl')
    skipped = {r['step']: r['train/skipped_steps'] for r in records if 'train/skipped_steps' in r}
    assert skipped == {2: 0.0, 4: 0.0, 6: 1.0}
    assert all(np.isfinite(r['train/loss']) for r in records if 'train/loss' in r)
    params = _params(workdir, cifar10_data_dir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))

    with pytest.raises(FloatingPointError, match='more than max_skipped_steps=0'):
        trainer.train_and_evaluate(
            _smoke(cifar10_data_dir, nonfinite='skip', max_skipped_steps=0),
            str(tmp_path / 'strict'),
        )


def _in_a_small_filesystem(directory, size_kb, command):
    """Runs `command` with a tmpfs of `size_kb` mounted on `directory`, in a mount namespace of
    its own (as root, or as a user with unprivileged user namespaces): a real full disk."""
    directory.mkdir(parents=True, exist_ok=True)
    namespace = ['unshare', '-m'] if os.geteuid() == 0 else ['unshare', '-rm']
    script = f'mount -t tmpfs -o size={size_kb}k tmpfs {directory} && exec "$@"'
    return subprocess.run(
        [*namespace, 'sh', '-c', script, 'sh', *command],
        cwd=REPO,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.mark.slow
def test_disk_full_while_saving_names_the_intact_checkpoint(tmp_path, cifar10_data_dir):
    # 3.6 MB hold the logs and the checkpoint of step 3 (about 2.3 MB), not the one of step 6.
    # Everything runs inside the namespace: afterwards the tmpfs, and the run, are gone.
    mount = tmp_path / 'small'
    check = (
        'import sys; from resnet_jax import checkpoint; d = sys.argv[1]; '
        'print(checkpoint.committed_steps(d), checkpoint.verify(d, 3))'
    )
    train = ' '.join(_train_argv(mount / 'run', cifar10_data_dir))
    result = _in_a_small_filesystem(
        mount,
        3600,
        [
            'sh',
            '-c',
            f'{sys.executable} {train} --config.total_steps=12; echo "exit=$?"; '
            f'{sys.executable} -c "{check}" {mount / "run" / "checkpoints"}',
        ],
    )
    out = result.stdout.strip().splitlines()
    assert out[-2:] == ['exit=1', '[3] None'], result.stdout + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if 'error' in line.lower()]
    assert errors == [
        f'error: could not save checkpoint step 6 to {mount / "run" / "checkpoints"}: No space '
        'left on device; the last complete checkpoint is step 3, and nothing was overwritten '
        '(free space, or point --workdir elsewhere, and rerun to resume)'
    ], result.stderr[-3000:]
    assert 'Traceback' not in result.stderr


def test_a_resume_under_another_data_stream_is_refused_before_anything_changes(
    tmp_path, cifar10_data_dir
):
    """The stream is a function of (seed, step) only given the fields that draw it: resuming
    with others (the CIFAR configs' new in-memory default, a changed seed) would silently
    train on other batches than the run it continues."""
    workdir = tmp_path / 'run'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=3), str(workdir))
    before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
    other = _smoke(cifar10_data_dir, seed=1, **{'dataset.in_memory': True})
    with pytest.raises(ValueError) as e:
        trainer.train_and_evaluate(other, str(workdir))
    assert str(e.value) == (
        f'the run in {str(workdir)!r} draws its batches with seed=0 (this config: 1), '
        'dataset.in_memory=False (this config: True); resumed under other values it would not '
        'continue its own data stream: pass --config.seed=0 --config.dataset.in_memory=False, '
        "or omit --config to take the workdir's own, or use another workdir"
    )
    assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == before
    # Fields that leave the stream alone may change: here the number of steps.
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=4), str(workdir))
    assert checkpoint.committed_steps(str(workdir / 'checkpoints'))[-1] == 4
    # A run that stopped before its first checkpoint has no stream yet: the next start records
    # its own config, so that its own resume is not refused.
    fresh = tmp_path / 'never_saved'
    fresh.mkdir()
    (fresh / workdir_lib.CONFIG_FILE).write_text(workdir_lib.config_json(_smoke(cifar10_data_dir)))
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, seed=1, total_steps=3), str(fresh))
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, seed=1, total_steps=4), str(fresh))
    assert workdir_lib.read_config(str(fresh)).seed == 1


def test_a_workdir_of_another_model_is_refused_before_anything_changes(tmp_path, cifar10_data_dir):
    """plain20 has exactly resnet20's parameter shapes: only the checkpoint's record of what it
    is tells them apart, with or without the workdir's config.json."""
    workdir = tmp_path / 'run'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=3), str(workdir))
    before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
    plain = _smoke(cifar10_data_dir, **{'model.name': 'plain20'})
    with pytest.raises(
        ValueError, match=r"of another network.*model.name='resnet20' \(this config: 'plain20'\)"
    ):
        trainer.train_and_evaluate(plain, str(workdir))
    # Without the recorded config, the checkpoint's own record refuses it.
    (workdir / workdir_lib.CONFIG_FILE).unlink()
    with pytest.raises(
        ValueError, match=r"checkpoint step 3 in .* is of another network.*model.shortcut='A'"
    ):
        trainer.train_and_evaluate(plain, str(workdir))
    with pytest.raises(ValueError, match=r'checkpoint step 3 in .* is of another network'):
        evaluation.read_run(str(workdir), config=plain)
    # So are other settings that change what the network computes from its input.
    other_input = _smoke(cifar10_data_dir, **{'dataset.normalization': 'channel'})
    with pytest.raises(ValueError, match=r"dataset.normalization='pixel_mean'"):
        trainer.train_and_evaluate(other_input, str(workdir))
    # Nothing changed, and no config.json was written by the refused commands.
    assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == {
        p: b for p, b in before.items() if p.name != workdir_lib.CONFIG_FILE
    }
    assert not (workdir / checkpoint.QUARANTINE_DIR).exists()


def test_a_workdir_that_cannot_be_created_is_one_clear_error(tmp_path, cifar10_data_dir):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a directory')
    with pytest.raises(ValueError, match=r'workdir .* cannot be created'):
        trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(blocker / 'run'))
    assert blocker.read_text() == 'not a directory'


@pytest.mark.parametrize(
    'record, message',
    [
        ({'image': np.zeros((32, 32, 1), np.uint8), 'label': 0}, r'image has shape \(32, 32, 1\)'),
        ({'image': np.zeros((32, 32, 3), np.float32), 'label': 0}, 'dtype float32; expected uint8'),
        ({'image': np.zeros((32, 32, 3), np.uint8), 'label': 10}, r'label 10 is outside \[0, 10\)'),
    ],
)
def test_malformed_records_stop_training_with_one_clear_error(
    record, message, tmp_path, cifar10_data_dir, monkeypatch
):
    info = sources.DatasetInfo('cifar10_jpeg', 10, (32, 32, 3), {'train': 64, 'test': 64})
    bad = [{**record, 'id': f'bad{i}'} for i in range(64)]

    def open_split(name, split, data_dir=None, download=False):
        return (bad if split.startswith('train') else synthetic_source(64)), info

    monkeypatch.setattr(sources, 'open_split', open_split)
    monkeypatch.setattr(preprocessing, 'pixel_mean', lambda name, data_dir: np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(tmp_path / 'run'))
    assert not (tmp_path / 'run' / 'checkpoints' / '3').exists()


@pytest.mark.parametrize(
    'args, message',
    [
        (['--num_processes=0', '--', 'train.py'], 'num_processes=0 and devices_per_process=2'),
        (['--num_processes=2'], 'no command; expected e.g. -- train.py'),
    ],
)
@pytest.mark.usefixtures('run_process')
def test_the_launcher_rejects_bad_input_with_one_line(args, message):
    result = subprocess.run(
        [sys.executable, str(LAUNCH), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.startswith('error: ') and message in result.stderr
