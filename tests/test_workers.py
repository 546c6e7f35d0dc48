"""Grain's worker processes (resnet_jax.workers): they end with their parent, ignore the signals
sent to their process group, and leave no shared memory behind.

Every test runs real processes (train.py, or tests/workers/group_signals.py), each bounded.
"""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from synthetic_data import example_indices, synthetic_info, synthetic_source

from resnet_jax import pipelines, preprocessing

REPO = pathlib.Path(__file__).resolve().parents[1]
GROUP_SIGNALS = REPO / 'tests' / 'workers' / 'group_signals.py'
TIMEOUT = 300  # seconds any one subprocess may take
# What a worker or the resource tracker prints when it fails or is killed at the wrong time.
NOISE = ('Traceback', 'leaked shared_memory', 'resource_tracker', 'Exception ignored')


def _train_argv(workdir, data_dir, **overrides):
    values = {'dataset.data_dir': data_dir, 'dataset.num_workers': 2, **overrides}
    values['dataset.in_memory'] = False  # the Grain pipeline, whose workers are tested
    flags = [f'--config.{k}={v}' for k, v in values.items()]
    return [sys.executable, 'train.py', '--config=configs/smoke.py', f'--workdir={workdir}', *flags]


def _start(workdir, data_dir, **overrides):
    """train.py in a session of its own (its own process group, as a shell's foreground job)."""
    return subprocess.Popen(
        _train_argv(workdir, data_dir, **overrides),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# Steps until it is stopped: the eval and the checkpoint never come.
LONG_RUN = {
    'total_steps': 10_000,
    'log_every_steps': 1,
    'eval_every_steps': 10_000,
    'checkpoint_every_steps': 10_000,
}


def _wait_for_step(workdir, step, proc):
    metrics = workdir / 'metrics.jsonl'
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and metrics.read_text().count('train/loss') >= step):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f'{workdir} did not reach step {step}'
        time.sleep(0.05)


def _stat(pid):
    """(state, parent pid, process group) of a process, from /proc/PID/stat; None once gone."""
    try:
        stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    state, ppid, pgrp = stat[stat.rindex(')') + 2 :].split()[:3]
    return state, int(ppid), int(pgrp)


def _processes():
    for entry in pathlib.Path('/proc').iterdir():
        stat = _stat(entry.name) if entry.name.isdigit() else None
        if stat is not None:
            yield int(entry.name), stat


def _children(pid):
    return [child for child, (_, ppid, _) in _processes() if ppid == pid]


def _running(pids):
    """Those of `pids` still running (a zombie has ended, only its exit status is left)."""
    return [pid for pid in pids if (_stat(pid) or ('Z',))[0] != 'Z']


def _wait_until_ended(pids, seconds):
    deadline = time.monotonic() + seconds
    while _running(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _running(pids)


def _end_group(pgid):
    """Ends what a failed test left of the process group it started: SIGKILL, multiprocessing's
    resource tracker last, once it has unlinked the shared memory the others left."""
    pids = _running([pid for pid, (_, _, group) in _processes() if group == pgid])
    trackers = [pid for pid in pids if b'resource_tracker' in _cmdline(pid)]
    for pid in pids:
        if pid not in trackers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in _wait_until_ended(trackers, 10):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid):
    try:
        return pathlib.Path(f'/proc/{pid}/cmdline').read_bytes()
    except OSError:
        return b''


def _assert_quiet(stderr):
    for noise in NOISE:
        assert noise not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_a_killed_trainer_takes_its_workers_and_the_resource_tracker_with_it(
    tmp_path, cifar10_data_dir
):
    proc = _start(tmp_path / 'run', cifar10_data_dir, **LONG_RUN)
    try:
        _wait_for_step(tmp_path / 'run', 2, proc)
        children = _children(proc.pid)
        assert len(children) >= 3, children  # 2 workers and multiprocessing's resource tracker
        proc.kill()
        proc.communicate(timeout=60)
        left = _wait_until_ended(children, 10)
        assert not left, [_cmdline(pid) for pid in left]
    finally:
        proc.kill()
        _end_group(proc.pid)


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_saves_and_the_workers_print_nothing(
    tmp_path, cifar10_data_dir
):
    """A terminal's Ctrl-C signals the whole foreground group: the trainer and its workers."""
    proc = _start(tmp_path / 'run', cifar10_data_dir, **LONG_RUN)
    try:
        _wait_for_step(tmp_path / 'run', 2, proc)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        _end_group(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    assert 'preempted: saved step' in out
    _assert_quiet(err)


RESUMED_RUN = {'total_steps': 30, 'log_every_steps': 1, 'eval_every_steps': 30}


def _losses(workdir):
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


def _run_to_end(workdir, data_dir, **overrides):
    result = subprocess.run(
        _train_argv(workdir, data_dir, **overrides),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, cifar10_data_dir):
    """An uninterrupted run with workers, the losses a stopped and resumed one must repeat."""
    workdir = tmp_path_factory.mktemp('straight') / 'run'
    _run_to_end(workdir, cifar10_data_dir, **RESUMED_RUN)
    return _losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP], ids=['sigterm', 'sighup'])
def test_a_signal_to_the_whole_process_group_saves_and_the_run_resumes_exactly(
    signum, tmp_path, cifar10_data_dir, straight_run
):
    """SLURM's --signal, systemd and GKE signal the whole group (SIGTERM); a dropped ssh session
    sends SIGHUP. The trainer saves the step, the workers neither die first nor print, nothing
    is left running, and the rerun continues the same losses."""
    workdir = tmp_path / 'run'
    proc = _start(workdir, cifar10_data_dir, **RESUMED_RUN)
    try:
        _wait_for_step(workdir, 2, proc)
        children = _children(proc.pid)
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert not _wait_until_ended(children, 10)  # no orphan
    finally:
        proc.kill()
        _end_group(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    saved = int(out.split('preempted: saved step ')[1].split(';')[0])
    assert saved < RESUMED_RUN['total_steps']
    _assert_quiet(err)
    resumed = _run_to_end(workdir, cifar10_data_dir, **RESUMED_RUN)
    assert f'at step {saved}' in resumed.stderr
    assert _losses(workdir) == straight_run


@pytest.mark.slow
def test_a_run_with_workers_ends_without_leaked_shared_memory(tmp_path, cifar10_data_dir):
    """Train and eval batches through the workers' shared memory, then the end of the run."""
    _assert_quiet(_run_to_end(tmp_path / 'run', cifar10_data_dir, total_steps=2).stderr)


# A process that notices its parent's death as workers do, started from a thread (as Grain starts
# its workers) that ends once the process is ready.
CHILD = """
import sys, time
from resnet_jax import workers
workers._end_with_parent(int(sys.argv[1]))
print('ready', flush=True)
time.sleep(60)
"""
PARENT = """
import os, signal, subprocess, sys, threading, time
def start(parent_pid):
    child = subprocess.Popen([sys.executable, '-c', CHILD, str(parent_pid)], stdout=subprocess.PIPE)
    children.append(child)
    child.stdout.readline()  # 'ready', or '' when it exited at once
children = []
for parent_pid in (os.getpid(), 1):  # this process; another (as if this one had died)
    thread = threading.Thread(target=start, args=(parent_pid,))
    thread.start()
    thread.join()
time.sleep(1)
print(*[child.pid for child in children], *[child.poll() for child in children], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_worker_outlives_the_thread_that_started_it_not_its_parent(run_process):
    """The kernel's parent-death signal comes when the starting *thread* ends: the worker goes on
    then, and ends when the process is gone; one whose parent died before it asked ends at once."""
    result = run_process(['-c', f'CHILD = {CHILD!r}\n{PARENT}'], timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    pid, _, code, other_code = result.stdout.split()
    assert (code, other_code) == ('None', '1')  # running; ended without a word
    assert not _wait_until_ended([int(pid)], 10)
    assert not result.stderr


@pytest.mark.usefixtures('run_process')  # a subprocess: the full tier
def test_workers_ignore_the_signals_sent_to_their_process_group():
    """SIGINT, SIGTERM and SIGHUP to the group (Ctrl-C, SLURM --signal, systemd, Kubernetes, a
    dropped ssh session), while the workers start and while they work: the parent gets them,
    the workers and the resource tracker go on, silent, and the batches are the same."""
    proc = subprocess.Popen(
        [sys.executable, str(GROUP_SIGNALS)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # It takes seconds; a worker killed as it started left it blocked for good.
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        _end_group(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    _assert_quiet(err)
    result = json.loads(out.strip().splitlines()[-1])
    assert result['signals'] == sorted([signal.SIGHUP, signal.SIGINT, signal.SIGTERM] * 2)
    preprocess = preprocessing.make_preprocess(
        synthetic_info(), train=False, augmentation='none', normalization='none'
    )
    in_process = iter(
        pipelines.train_dataset(synthetic_source(64), preprocess, batch_size=8, seed=0)
    )
    expected = [example_indices(next(in_process)['image']).tolist() for _ in range(6)]
    assert result['examples'] == expected
