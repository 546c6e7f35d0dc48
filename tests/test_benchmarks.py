"""The benchmark scripts run and print their JSON record (tiny settings; figures not checked)."""

import importlib
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *flags):
    env = {**os.environ, 'XLA_FLAGS': ''}  # one CPU device, as a user's plain run has
    result = subprocess.run(
        [sys.executable, os.path.join('benchmarks', script), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_step_benchmark_compares_ours_with_both_peers():
    out, record = _run(
        'train_step.py', '--model=resnet20', '--batch_size=8', '--steps=2', '--peers=flax,torch'
    )
    assert set(record['runs']) == {'ours', 'flax', 'torch'}
    assert set(record['ratios']) == {'ours/flax', 'ours/torch'}
    for run in record['runs'].values():
        assert run['step_s'] > 0 and run['images_per_s'] > 0
    assert record['ours_tflops_per_s'] > 0
    assert 'ours/flax' in out


@pytest.mark.slow
def test_compile_time_benchmark():
    _, record = _run('compile_time.py', '--models=resnet20', '--steps=2')
    times = record['models']['resnet20']
    assert times['unrolled_s'] > 0 and times['scanned_s'] > 0
    assert times['unrolled']['step_s'] > 0 and times['scanned']['step_s'] > 0


@pytest.mark.slow
def test_memory_benchmark_shows_accumulation_shrinking_the_step():
    _, record = _run(
        'memory.py', '--model=resnet20', '--batch_size=8', '--image_size=16', '--scan_blocks'
    )
    temp = {r['setting']: r['temp_bytes'] for r in record['results']}
    assert len(temp) == 4 and min(temp.values()) > 0
    # Compiled memory is deterministic: a micro-batch of a quarter needs less than the batch.
    assert temp['4 x 2, accumulated'] < temp['one step']


@pytest.mark.slow
def test_steps_per_call_benchmark_times_each_k():
    _, record = _run('steps_per_call.py', '--batch_size=4', '--calls_steps=4', '--ks=1,2')
    assert [r['k'] for r in record['results']] == [1, 2]
    for r in record['results']:
        assert r['steps_per_s'] > 0 and r['p90_ms'] >= r['p50_ms'] > 0


@pytest.mark.slow
def test_loop_and_profile_benchmarks_write_their_records(tmp_path):
    _, record = _run(
        'loop_throughput.py',
        '--model=resnet20',
        '--batch_size=4',
        '--image_size=16',
        '--steps=3',
        '--dtype=float32',
    )
    assert [r['prefetch_batches'] for r in record['results']] == [0, 2]
    assert all(r['images_per_s'] > 0 for r in record['results'])
    assert record['results'][0]['host_bytes_per_step'] == 4 * 16 * 16 * 3  # uint8
    out = tmp_path / 'profile'
    _, record = _run(
        'profile_step.py',
        f'--out={out}',
        '--model=resnet20',
        '--batch_size=4',
        '--image_size=16',
        '--steps=2',
        '--dtype=float32',
    )
    assert record['memory_bytes']['temp'] > 0
    assert json.loads((out / 'memory.json').read_text()) == record
    assert any(files for _, _, files in os.walk(out / 'trace'))


@pytest.mark.slow
def test_input_pipeline_benchmark_measures_uint8_batches_and_cores(cifar10_data_dir):
    _, record = _run(
        'input_pipeline.py',
        f'--data_dir={cifar10_data_dir}',
        '--workers=0,2',
        # A pipeline with 2 workers holds about 8 batches made while the others were timed: a
        # turn of a few batches can be all of them, timed in under a clock tick of CPU (/proc's
        # 10 ms), and its row reports 0 cores. 12 outlast that buffer.
        '--batches=12',
        '--rounds=1',
        '--photos=128',
    )
    rows = {(r['pipeline'], r['settings']): r for r in record['rows']}
    assert rows[('CIFAR-10 host', '2 workers, batch 128')]['bytes_per_image'] == 32 * 32 * 3
    photo = rows[('photos, scale_crop_flip', '2 workers x 1 threads')]
    assert photo['dtype'] == 'uint8' and photo['bytes_per_step'] == 64 * 224 * 224 * 3
    assert all(r['images_per_s'] > 0 and r['cores'] > 0 for r in record['rows'])
    assert record['photos']['count'] == 128 and record['photos']['mean_bytes'] > 30_000
    assert record['scale_crop_flip_workers2_over_0'] > 0
    assert set(record['inception_crop_flip_cores_for']) == {'3000', '7000'}
    assert record['large_photo']['crop_aware_ms'] > 0


def test_read_bytes_benchmark_measures_what_a_random_record_costs(cifar10_data_dir):
    _, record = _run(
        'read_bytes.py', f'--data_dir={cifar10_data_dir}', '--reads=200', '--photos=16'
    )
    cifar, photos = record['cifar10'], record['imagenet_like']
    # A random read of a record costs at least the record (ArrayRecord reads whole blocks).
    assert cifar['records'] == 50_000 and cifar['bytes_per_read'] >= cifar['file_bytes_per_record']
    assert photos['count'] == 16 and photos['mean_jpeg_bytes'] > 30_000
    assert photos['array_record_bytes_per_read'] >= photos['mean_jpeg_bytes']
    need = record['host_needs']['10000']
    assert need['MB_per_s'] == pytest.approx(1e4 * photos['array_record_bytes_per_read'] / 1e6)


@pytest.mark.slow
def test_cifar_loop_benchmark_runs_the_trainer_both_ways(cifar10_data_dir):
    out, record = _run(
        'cifar_loop.py',
        f'--data_dir={cifar10_data_dir}',
        '--batch_size=16',
        '--steps=4',
        '--log_every=2',
        '--train_split=train[:256]',
    )
    assert [r['in_memory'] for r in record['results']] == [False, True]
    assert all(r['images_per_s'] > 0 and r['intervals'] == 1 for r in record['results'])
    assert 'in memory / host' in out


@pytest.mark.usefixtures('run_process')
def test_prefetch_benchmark_reports_the_stall_of_each_setting():
    _, record = _run('prefetch.py', '--steps=10', '--step_ms=2', '--host_ms=1', '--sizes=0,2')
    assert set(record['results']) == {'0', '2'}
    for r in record['results'].values():
        assert 0 <= r['stall_fraction'] <= 1 and r['steps_per_s'] > 0


# What the GPU machine's image lacks of resnet_jax's dependencies (the device tool's package
# list): the scripts a GPU session runs must work without them.
NOT_ON_THE_GPU_IMAGE = (
    'grain',
    'tensorflow_datasets',
    'tensorflow',
    'array_record',
    'ml_collections',
    'tensorboardX',
    'gcsfs',
)
# BENCHMARKS.md's follow-ups for a longer GPU slot, each run on its own.
GPU_FOLLOW_UP_SCRIPTS = ('train_step', 'loop_throughput', 'steps_per_call', 'profile_step')
BLOCKER = """
import importlib, importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {absent!r}:
            raise ImportError(name + ' is not on the GPU image')
sys.meta_path.insert(0, Absent())
"""


@pytest.mark.usefixtures('run_process')
def test_the_gpu_follow_up_scripts_need_neither_grain_nor_tensorflow_datasets():
    program = (
        BLOCKER.format(absent=NOT_ON_THE_GPU_IMAGE)
        + f"""
sys.path.insert(0, 'benchmarks')
for script in {GPU_FOLLOW_UP_SCRIPTS!r}:
    importlib.import_module(script)
print('imported')
"""
    )
    with open(os.path.join(REPO, 'BENCHMARKS.md')) as f:
        benchmarks_md = f.read()
    assert all(f'benchmarks/{script}.py' in benchmarks_md for script in GPU_FOLLOW_UP_SCRIPTS)
    result = subprocess.run(
        [sys.executable, '-c', program], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and 'imported' in result.stdout, result.stderr[-3000:]


def _gpu_check(out, *flags, program=None):
    """benchmarks/gpu_check.py, SMALL, run from elsewhere with no PYTHONPATH (as on the GPU
    machine: the checkout alone); its exit status, record and files."""
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'OUT')}
    env.update(SMALL='1', OUT=str(out), XLA_FLAGS='')
    # A compilation cache asked for under $OUT (as gpu_suite.sh did) must not be written there.
    env.update(JAX_COMPILATION_CACHE_DIR=str(out / 'xla_cache'))
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    script = os.path.join(REPO, 'benchmarks', 'gpu_check.py')
    argv = ['-c', program, script, *flags] if program else [script, *flags]
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    files = sorted(p.name for p in out.iterdir())
    record = json.loads((out / 'gpu_check.json').read_text())
    return result, record, files


@pytest.mark.slow
@pytest.mark.usefixtures('run_process')
def test_gpu_check_small_runs_every_phase_into_two_files(tmp_path):
    result, record, files = _gpu_check(tmp_path / 'out')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert files == ['gpu_check.json', 'gpu_check.txt']  # the device tool brings back 8
    assert record['environment']['resnet_jax'] == os.path.join(REPO, 'resnet_jax')
    assert record['not_allowed_loaded'] == []  # sys.modules at the end of the run
    phases = record['phases']
    assert [phases[p]['status'] for p in ('host', 'step', 'loop', 'torch')] == ['ok'] * 4
    assert phases['host']['one_thread']['images_per_s'] > 0
    ours, flax = phases['step']['runs']['ours'], phases['step']['runs']['flax']
    for run in (ours, flax):
        assert run['compile_s'] > 0 and run['p90_ms'] >= run['p50_ms'] >= run['p10_ms'] > 0
    assert ours['mfu_model'] is None and ours['mfu_xla'] is None  # no peak known for a CPU
    flops = phases['step']['flops_per_step']
    # The two counts of one step agree roughly (XLA skips the taps on padding and the stem's
    # input gradient, which 3 x the forward count includes: most at ResNet-18, 64x64).
    assert 0.7 < flops['xla'] / flops['model'] < 1.1
    loop = phases['loop']
    assert 0 <= loop['stall_fraction'] <= 1 and loop['on_device']['images_per_s'] > 0
    assert phases['torch']['images_per_s'] > 0
    summary = record['summary']
    assert set(summary) >= {'ours_images_per_s', 'flax_step_over_ours', 'loop_stall_fraction'}
    assert (tmp_path / 'out' / 'gpu_check.txt').read_text() == result.stdout


@pytest.mark.slow
@pytest.mark.usefixtures('run_process')
def test_gpu_check_records_a_failing_phase_runs_the_rest_and_exits_1(tmp_path):
    # Without the packages the GPU image lacks, nor torch or scikit-image: the torch phase
    # skips with its reason, the JPEGs come from synthetic scenes.
    absent = (*NOT_ON_THE_GPU_IMAGE, 'torch', 'torchvision', 'skimage')
    program = (
        BLOCKER.format(absent=absent)
        + """
import os, runpy
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as python does for a script
runpy.run_path(sys.argv[0], run_name='__main__')
"""
    )
    result, record, files = _gpu_check(tmp_path / 'out', '--fail=step', program=program)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert files == ['gpu_check.json', 'gpu_check.txt']
    phases = record['phases']
    assert phases['step']['status'] == 'failed' and '--fail=step' in phases['step']['error']
    assert phases['host']['status'] == 'ok'
    assert phases['host']['jpegs']['source'].startswith('synthetic')
    # The loop builds the step that the failed phase did not.
    assert phases['loop']['status'] == 'ok' and phases['loop']['host_fed']['images_per_s'] > 0
    assert phases['torch']['status'] == 'skipped' and 'torch' in phases['torch']['reason']
    assert 'failed: step' in result.stdout


def test_gpu_check_sees_a_package_the_gpu_image_lacks(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, 'benchmarks'))
    gpu_check = importlib.import_module('gpu_check')
    assert gpu_check.not_allowed_loaded({'jax': 0, 'grain.python': 0, 'gcsfs': 0}) == [
        'gcsfs',
        'grain',
    ]
    assert set(gpu_check.NOT_ALLOWED) == set(NOT_ON_THE_GPU_IMAGE)


@pytest.mark.parametrize(
    'argv, message',
    [
        (['train_step.py', '--devices=3', '--batch_size=8'], '--devices 3 exceeds the 1 devices'),
        (['compile_time.py', '--steps=-1'], '--steps=-1: expected a count >= 0'),
        (
            ['memory.py', '--batch_size=10', '--accumulate_steps=4'],
            '--accumulate_steps=4 does not divide --batch_size=10',
        ),
        (['steps_per_call.py', '--ks=1,x'], "--ks='1,x': expected comma-separated positive ints"),
        (['prefetch.py', '--steps=0'], '--steps=0: expected > 0'),
        (['gpu_check.py', '--out='], 'no output folder: set OUT or pass --out=DIR'),
        (
            ['gpu_check.py', '--out=/tmp/x', '--phases=host,gpu'],
            "unknown phase 'gpu'; expected names from host, step, loop, torch",
        ),
        (['gpu_check.py', '--out=/tmp/x', '--steps=0'], '--steps=0: expected at least 1'),
        (
            ['input_pipeline.py', '--data_dir=/nowhere', '--photos=10'],
            '--photos=10: expected at least 128',
        ),
        (['input_pipeline.py', '--data_dir=/nowhere', '--rounds=0'], '--rounds=0: expected at'),
        (['read_bytes.py', '--rates=8000,x'], "--rates='8000,x': expected comma-separated"),
        (['input_pipeline.py', '--data_dir=/x', '--workers=0,-1'], '--workers=-1: expected at'),
        (['input_pipeline.py', '--data_dir=/x', '--workers=2,a'], "--workers='2,a': expected"),
        (
            ['cifar_loop.py', '--data_dir=/nowhere', '--steps=3', '--log_every=2'],
            '--steps must be a multiple of --log_every',
        ),
    ],
)
@pytest.mark.usefixtures('run_process')
def test_benchmarks_reject_bad_flags(argv, message):
    result = subprocess.run(
        [sys.executable, os.path.join('benchmarks', argv[0]), *argv[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, 'XLA_FLAGS': ''},  # one device
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
