"""Every command's bad input: one `error:` line, a non-zero exit, nothing in the workdir changed.

Each case is a row of the bad-input table in docs/reliability.md. The commands run as a user
runs them, as subprocesses from the repository root.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from configs import smoke
from resnet_jax import config as config_lib
from resnet_jax import lock, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300


def _run(argv, *, env=None, cwd=REPO):
    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _snapshot(directory):
    if not directory.exists():
        return None
    return {p: p.read_bytes() for p in directory.rglob('*') if p.is_file()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory, cifar10_data_dir):
    """A resnet20 workdir trained for 3 steps (copied by each case that changes it)."""
    directory = tmp_path_factory.mktemp('trained') / 'run'
    config = smoke.get_config()
    config_lib.apply_overrides(
        config, {'dataset.data_dir': str(cifar10_data_dir), 'total_steps': 3}
    )
    trainer.train_and_evaluate(config, str(directory))
    return directory


@pytest.fixture(scope='module')
def damaged_data(tmp_path_factory, cifar10_data_dir):
    """A copy of the CIFAR-10 data dir whose test file has one flipped byte."""
    root = tmp_path_factory.mktemp('damaged')
    shutil.copytree(cifar10_data_dir / 'cifar10_jpeg', root / 'cifar10_jpeg')
    (test_file,) = (root / 'cifar10_jpeg').rglob('cifar10_jpeg-test.array_record*')
    blob = bytearray(test_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    test_file.write_bytes(bytes(blob))
    return root


def _train(w, data, *flags, config='configs/smoke.py'):
    return [
        'train.py',
        f'--config={config}',
        f'--workdir={w}',
        f'--config.dataset.data_dir={data}',
        *flags,
    ]


def _evaluate(w, *flags):
    return ['-m', 'resnet_jax', 'evaluate', f'--workdir={w}', '--split=test[:16]', *flags]


def _copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / 'run')
    return tmp_path / 'run'


def _corrupt_checkpoint(step_dir):
    target = max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))


def _write(path, text):
    path.write_text(text)
    return path


# (id, setup(tmp_path, data_dir, trained, damaged_data) -> (argv, workdir or None), exit code,
#  what the one error line must contain)
CASES = [
    # --- config ---------------------------------------------------------------------------
    (
        'unknown-key',
        lambda t, d, w, x: (_train(t / 'run', d, '--config.optimizer.lr=1'), t / 'run'),
        2,
        "unknown config key in --config.optimizer.lr=1: 'lr' is not a field of the config",
    ),
    (
        'near-miss-key',
        lambda t, d, w, x: (_train(t / 'run', d, '--config.totl_steps=5'), t / 'run'),
        2,
        "unknown config key in --config.totl_steps=5: 'totl_steps' is not a field of the config; "
        'did you mean total_steps?',
    ),
    (
        'near-miss-nested-key',
        lambda t, d, w, x: (
            _train(t / 'run', d, '--config.optimizer.learing_rate=0.1'),
            t / 'run',
        ),
        2,
        "unknown config key in --config.optimizer.learing_rate=0.1: 'learing_rate' is not a field "
        'of the config; did you mean optimizer.learning_rate?',
    ),
    (
        'wrong-type',
        lambda t, d, w, x: (_train(t / 'run', d, '--config.total_steps=ten'), t / 'run'),
        2,
        "flag --config.total_steps=ten: invalid literal for int() with base 10: 'ten'",
    ),
    (
        'missing-config-file',
        lambda t, d, w, x: (_train(t / 'run', d, config='configs/nope.py'), t / 'run'),
        2,
        "config file 'configs/nope.py' does not exist; expected e.g. configs/cifar10.py",
    ),
    (
        's3-workdir',
        lambda t, d, w, x: (_train('s3://my-bucket/run', d), None),
        1,
        "workdir 's3://my-bucket/run': s3:// is not supported; expected a local path or "
        'gs://BUCKET/FOLDER',
    ),
    (
        'gs-data-dir',
        lambda t, d, w, x: (_train(t / 'run', 'gs://my-bucket/tfds'), t / 'run'),
        1,
        "data_dir 'gs://my-bucket/tfds' is a cloud storage URL; the input pipeline reads local "
        'files: copy the prepared dataset to local disk',
    ),
    (
        's3-workdir-evaluate',
        lambda t, d, w, x: (_evaluate('s3://my-bucket/run'), None),
        1,
        "workdir 's3://my-bucket/run': s3:// is not supported",
    ),
    (
        'config-syntax-error',
        lambda t, d, w, x: (
            _train(t / 'run', d, config=_write(t / 'bad.py', 'def get_config(:\n')),
            t / 'run',
        ),
        2,
        'bad.py, line 1: invalid syntax',
    ),
    (
        'config-without-get_config',
        lambda t, d, w, x: (_train(t / 'run', d, config=_write(t / 'c.py', 'x = 1\n')), t / 'run'),
        2,
        'c.py' + "' defines no get_config(arg) function",
    ),
    (
        'config-rejects-its-argument',
        lambda t, d, w, x: (_train(t / 'run', d, config='configs/cifar10.py:resnet50'), t / 'run'),
        2,
        "configs/cifar10.py: unknown model 'resnet50'",
    ),
    (
        'negative-learning-rate',
        lambda t, d, w, x: (
            _train(t / 'run', d, '--config.optimizer.learning_rate=-1'),
            t / 'run',
        ),
        1,
        'optimizer.learning_rate=-1.0; expected a finite number > 0',
    ),
    (
        'unknown-optimizer',
        lambda t, d, w, x: (_train(t / 'run', d, '--config.optimizer.name=adamm'), t / 'run'),
        1,
        "optimizer.name='adamm'; expected one of sgd, momentum",
    ),
    (
        'infinite-mixup-alpha',
        lambda t, d, w, x: (_train(t / 'run', d, '--config.mixup_alpha=inf'), t / 'run'),
        1,
        'invalid config: mixup_alpha=inf; expected a finite number >= 0 (0: off)',
    ),
    (
        'accumulation-not-dividing-the-run',
        lambda t, d, w, x: (
            _train(t / 'run', d, '--config.optimizer.accumulate_steps=4'),
            t / 'run',
        ),
        1,
        'invalid config: optimizer.accumulate_steps=4 does not divide total_steps=6: the last 2 '
        'micro-batches would never be applied',
    ),
    (
        'label-smoothing-out-of-range',
        lambda t, d, w, x: (_train(t / 'run', d, '--config.label_smoothing=1.5'), t / 'run'),
        1,
        'label_smoothing=1.5',
    ),
    (
        'bn-group-not-dividing-the-batch',
        lambda t, d, w, x: (_train(t / 'run', d, '--config.bn_group_size=5'), t / 'run'),
        1,
        'bn_group_size=5 does not divide batch_size=16',
    ),
    (
        'warm-up-longer-than-the-run',
        lambda t, d, w, x: (_train(t / 'run', d, '--config.optimizer.warmup_steps=6'), t / 'run'),
        1,
        'optimizer.warmup_steps=6 must be below total_steps=6',
    ),
    (
        'no-read-threads',
        lambda t, d, w, x: (_train(t / 'run', d, '--config.dataset.read_threads=0'), t / 'run'),
        1,
        'dataset.read_threads=0; expected a positive int',
    ),
    (
        'unknown-dtype',
        lambda t, d, w, x: (_train(t / 'run', d, '--config.dtype=float16'), t / 'run'),
        1,
        "dtype='float16'; expected one of float32, bfloat16",
    ),
    (
        'stray-argument',
        lambda t, d, w, x: ([*_train(t / 'run', d), 'resnet56'], t / 'run'),
        2,
        "unexpected arguments ['resnet56']; expected only --flags",
    ),
    (
        'no-workdir',
        lambda t, d, w, x: (['train.py', '--config=configs/smoke.py'], None),
        2,
        'flag --workdir=None: Flag --workdir must have a value other than None',
    ),
    # --- workdir --------------------------------------------------------------------------
    (
        'empty-workdir',  # once: trained into the current directory
        lambda t, d, w, x: (_train('', d), REPO / 'checkpoints'),
        1,
        "--workdir '' is empty; expected a path",
    ),
    (
        'blank-workdir',  # once: trained into a folder named ' '
        lambda t, d, w, x: (_train(' ', d), REPO / ' '),
        1,
        "--workdir ' ' is blank; expected a path",
    ),
    (
        'empty-workdir-evaluate',
        lambda t, d, w, x: (_evaluate(''), REPO / 'checkpoints'),
        1,
        "--workdir '' is empty; expected a path",
    ),
    (
        'workdir-in-use',
        lambda t, d, w, x: (_train(_locked(w, t), d), t / 'run'),
        1,
        f'is in use by another trainer (pid {os.getpid()} on host',
    ),
    (
        'workdir-of-another-network',
        lambda t, d, w, x: (_train(_copy(w, t), d, '--config.model.name=plain20'), t / 'run'),
        1,
        "is of another network or optimizer: model.name='resnet20' (this config: 'plain20')",
    ),
    (
        'resume-with-another-data-stream',
        lambda t, d, w, x: (_train(_copy(w, t), d, '--config.dataset.in_memory=True'), t / 'run'),
        1,
        'draws its batches with dataset.in_memory=False (this config: True); resumed under other '
        'values it would not continue its own data stream: pass --config.dataset.in_memory=False',
    ),
    (
        'workdir-under-a-file',
        lambda t, d, w, x: (_train(_write(t / 'f', 'x') / 'run', d), t / 'f'),
        1,
        'cannot be created: Not a directory',
    ),
    # --- data -----------------------------------------------------------------------------
    (
        'no-data-dir',
        lambda t, d, w, x: (_train(t / 'run', t / 'nodata'), t / 'run'),
        1,
        'nodata' + "' does not exist; expected a TFDS data directory",
    ),
    (
        'damaged-dataset-file',
        lambda t, d, w, x: (_train(t / 'run', x), t / 'run'),
        1,
        'cifar10_jpeg-test.array_record-00000-of-00001 is damaged (RuntimeError: Corrupted',
    ),
    (
        'malformed-split',
        lambda t, d, w, x: (
            _train(t / 'run', d, '--config.dataset.eval_split=test[:x]'),
            t / 'run',
        ),
        1,
        "cannot read split 'test[:x]' of 'cifar10_jpeg'",
    ),
    (
        'split-smaller-than-the-batch',
        lambda t, d, w, x: (
            _train(t / 'run', d, '--config.dataset.train_split=train[:8]'),
            t / 'run',
        ),
        1,
        "batch_size 16 exceeds the 8 examples of 'train[:8]'",
    ),
    # --- checkpoints and evaluation -------------------------------------------------------
    (
        'evaluate-without-checkpoints',
        lambda t, d, w, x: (
            _evaluate(t / 'empty', '--config=configs/smoke.py', f'--config.dataset.data_dir={d}'),
            t / 'empty',
        ),
        1,
        'checkpoints' + "'; expected a workdir written by train.py",
    ),
    (
        'evaluate-a-missing-step',
        lambda t, d, w, x: (_evaluate(w, '--step=99'), w),
        1,
        'checkpoint step 99 not in',
    ),
    (
        'evaluate-a-damaged-checkpoint',
        lambda t, d, w, x: (_evaluate(_damaged_checkpoint(w, t)), t / 'run'),
        1,
        'is damaged: its files do not match the fingerprint written when it was saved',
    ),
    (
        'evaluate-without-a-recorded-config',
        lambda t, d, w, x: (_evaluate(t / 'bare'), t / 'bare'),
        1,
        'config.json does not exist; expected the workdir of a run started by train.py',
    ),
    (
        'evaluate-a-negative-step',
        lambda t, d, w, x: (_evaluate(w, '--step=-1'), w),
        1,
        '--step=-1; expected a checkpoint step >= 0 (or none)',
    ),
    (
        'evaluate-an-empty-split',
        lambda t, d, w, x: ([*_evaluate(w), '--split='], w),
        1,
        "--split=''; expected a split name, e.g. test",
    ),
    (
        'export-to-the-workdir',  # once: found after evaluating, a .tmp file left in the workdir
        lambda t, d, w, x: (_evaluate(w, f'--export={w}/'), w),
        1,
        "is a directory; expected a file name in it, e.g. '",
    ),
    (
        'export-of-an-unknown-kind',  # once: silently msgpack
        lambda t, d, w, x: (_evaluate(w, f'--export={t}/model.pt'), w),
        1,
        "model.pt' has suffix '.pt'; expected .stablehlo, .onnx, .msgpack",
    ),
    (
        'analysis-an-empty-split',
        lambda t, d, w, x: (['-m', 'resnet_jax', 'analysis', f'--workdir={w}', '--split='], w),
        1,
        "--split=''; expected a split name, e.g. test",
    ),
    (
        'evaluate-as-another-network',
        lambda t, d, w, x: (_evaluate(w, '--config.model.name=plain20'), w),
        1,
        "is of another network or optimizer: model.name='resnet20' (this config: 'plain20')",
    ),
    (
        'no-usable-checkpoint',
        lambda t, d, w, x: (_train(_damaged_checkpoint(w, t), d, '--config.total_steps=9'), None),
        1,
        'no usable checkpoint in',
    ),
    # --- sweep and report -----------------------------------------------------------------
    (
        'sweep-unknown-model',
        lambda t, d, w, x: (
            [
                '-m',
                'resnet_jax',
                'sweep',
                '--config=configs/cifar10.py',
                '--models=resnet21',
                f'--workdir={t / "s"}',
            ],
            t / 's',
        ),
        1,
        "model 'resnet21'; expected one of resnet18",
    ),
    (
        'sweep-unknown-grid',
        lambda t, d, w, x: (
            [
                '-m',
                'resnet_jax',
                'sweep',
                '--config=configs/cifar10.py',
                '--models=resnet20',
                '--grid=depths',
                f'--workdir={t / "s"}',
            ],
            t / 's',
        ),
        1,
        "grid 'depths'; expected one of models, shortcuts, optimizers",
    ),
    (
        'report-of-a-damaged-run-record',
        lambda t, d, w, x: (['-m', 'resnet_jax', 'report', f'--workdir={_bad_record(w, t)}'], None),
        1,
        'run.json is not valid JSON',
    ),
    (
        'report-of-nothing',
        lambda t, d, w, x: (['-m', 'resnet_jax', 'report', f'--workdir={t / "none"}'], None),
        1,
        'none' + "' is not a directory",
    ),
]


def _locked(trained, tmp_path):
    """A workdir whose lock is held by a live process (this test's)."""
    run = _copy(trained, tmp_path)
    owner = {'host': os.uname().nodename, 'pid': os.getpid(), 'token': 't', 'started': time.time()}
    (run / lock.LOCK_FILE).write_text(json.dumps(owner))
    return run


def _damaged_checkpoint(trained, tmp_path):
    run = _copy(trained, tmp_path)
    for step in (run / 'checkpoints').iterdir():
        _corrupt_checkpoint(step)
    return run


def _bad_record(trained, tmp_path):
    run = _copy(trained, tmp_path)
    (run / 'run.json').write_text('{"name": ')
    return run


@pytest.mark.slow
@pytest.mark.parametrize('name, setup, code, message', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(
    name, setup, code, message, tmp_path, cifar10_data_dir, trained, damaged_data
):
    (tmp_path / 'bare').mkdir()
    argv, watched = setup(tmp_path, cifar10_data_dir, trained, damaged_data)
    before = _snapshot(watched) if watched else None
    result = _run(argv)
    assert result.returncode == code, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    # One error line, last; before it at most the log's own warnings (a checkpoint set aside).
    assert [line for line in lines if line.startswith('error')] == lines[-1:], result.stderr
    assert all(' WARNING ' in line for line in lines[:-1]), result.stderr[-3000:]
    assert lines[-1].startswith('error: '), lines[-1]
    assert message in lines[-1], lines[-1]
    assert 'Traceback' not in result.stderr
    if watched is not None:
        assert _snapshot(watched) == before, f'{name} changed {watched}'


@pytest.mark.slow
def test_train_py_resumes_with_the_workdirs_own_config(trained, tmp_path):
    """The refusal hints say "omit --config to take the workdir's own": that works, and
    --config.x=y still applies (here: more steps)."""
    run = _copy(trained, tmp_path)
    result = _run(['train.py', f'--workdir={run}', '--config.total_steps=4'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resumed from' in result.stderr and 'at step 3' in result.stderr
    assert 'done at step 4 (1 this run)' in result.stderr
    typo = _run(['train.py', f'--workdir={run}', '--config.totl_steps=5'])
    assert typo.returncode == 1
    assert typo.stderr.strip().splitlines()[-1] == (
        "error: unknown config key totl_steps: 'totl_steps' is not a field of the config; did you "
        'mean total_steps?'
    )


def test_verbose_adds_the_traceback(tmp_path, cifar10_data_dir):
    result = _run(
        [*_train(tmp_path / 'run', cifar10_data_dir, '--config.dtype=float16'), '--verbose']
    )
    assert result.returncode == 1
    assert 'Traceback (most recent call last)' in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1].startswith("error: invalid config: dtype='float16'")
    )
    debug = _run(
        _train(tmp_path / 'run', cifar10_data_dir, '--config.dtype=float16'),
        env={'RESNET_JAX_DEBUG': '1'},
    )
    assert 'Traceback (most recent call last)' in debug.stderr


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_exits_0_like_sigterm(tmp_path, cifar10_data_dir):
    run = tmp_path / 'run'
    proc = subprocess.Popen(
        [
            sys.executable,
            *_train(
                run, cifar10_data_dir, '--config.total_steps=10000', '--config.log_every_steps=1'
            ),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / 'metrics.jsonl'
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and metrics.read_text().count('train/loss') >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-2000:]
    assert 'got SIGINT: stopping at the next step and saving it' in err
    saved = int(out.split('preempted: saved step ')[1].split(';')[0])
    assert (run / 'checkpoints' / str(saved) / 'commit_success.txt').exists()
    assert not (run / lock.LOCK_FILE).exists()  # released on the way out


def test_make_data_with_a_missing_or_damaged_archive_is_one_error_line(tmp_path, run_process):
    def make(shared):
        argv = ['make', '--no-print-directory', 'data', f'SHARED={shared}']
        return run_process([*argv, f'DATA_DIR={tmp_path / "tfds"}'], executable=None)

    missing = make(tmp_path / 'nothing')
    assert missing.returncode != 0
    errors = [line for line in missing.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'cifar10_jpeg.tar.xz not found' in errors[0], missing.stderr
    damaged = tmp_path / 'shared'
    (damaged / 'data').mkdir(parents=True)
    (damaged / 'data' / 'cifar10_jpeg.tar.xz').write_bytes(b'not an archive')
    result = make(damaged)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'is damaged: its sha256 is' in errors[0], result.stderr
    assert not (tmp_path / 'tfds' / 'cifar10_jpeg').exists()
