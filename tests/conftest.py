"""Test set-up: 8 simulated CPU devices, Keras on JAX, the real CIFAR-10 on disk, and tiers.

The environment variables must be set before JAX (or Keras) is first imported, which is why
they live here, at the top of the first module pytest loads.

Tiers: a test is `fast` unless it is marked slow or asks for one of the fixtures in
`NEEDS_MORE_THAN_THIS_PROCESS` (the real data, PyTorch, Keras, a subprocess); every other test
is `full`. `make test-fast` runs `-m fast` (seconds after an edit); `make test` runs both. The
split follows from what each test asks for, never from a list kept by hand, and a fast test
that starts a subprocess without asking fails.
"""

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('KERAS_BACKEND', 'jax')  # Keras references run without TensorFlow.

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR10_ARCHIVE = REPO.parent / 'shared' / 'data' / 'cifar10_jpeg.tar.xz'
DATA_DIR = pathlib.Path(
    os.environ.get('RESNET_JAX_DATA_DIR', pathlib.Path.home() / '.cache' / 'resnet_jax' / 'tfds')
)


def extract_cifar10(data_dir: pathlib.Path = DATA_DIR) -> pathlib.Path:
    """Extracts the shared CIFAR-10 TFDS directory once; returns the TFDS data_dir."""
    marker = data_dir / 'cifar10_jpeg' / '1.0.0' / 'dataset_info.json'
    if marker.exists():
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    # One extraction at a time: the test workers (pytest -n) all ask for it at the start.
    with open(data_dir / '.extract.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():  # another worker extracted it while this one waited
            return data_dir
        if not CIFAR10_ARCHIVE.exists():
            pytest.fail(f'{CIFAR10_ARCHIVE} is missing: the tests need the shared CIFAR-10 copy')
        # Beside the final place, then moved in: a cut-off extraction leaves no half dataset.
        partial = data_dir / f'.extracting-{os.getpid()}'
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with tarfile.open(CIFAR10_ARCHIVE) as archive:
            archive.extractall(partial, filter='data')
        shutil.rmtree(data_dir / 'cifar10_jpeg', ignore_errors=True)
        (partial / 'cifar10_jpeg').rename(data_dir / 'cifar10_jpeg')
        partial.rmdir()
    return data_dir


@pytest.fixture(scope='session')
def cifar10_data_dir() -> pathlib.Path:
    return extract_cifar10()


@pytest.fixture(scope='session')
def cifar(cifar10_data_dir):
    """(the real CIFAR-10 train split, its info, the data_dir)."""
    from resnet_jax import sources

    source, info = sources.open_split('cifar10_jpeg', 'train', str(cifar10_data_dir))
    return source, info, str(cifar10_data_dir)


NEEDS_MORE_THAN_THIS_PROCESS = {
    'cifar10_data_dir': 'the real CIFAR-10 copy',
    'cifar': 'the real CIFAR-10 copy',
    'torch': 'PyTorch',
    'keras': 'Keras',
    'run_process': 'a subprocess',
    'gcs_bucket': 'a GCS emulator',
}


def pytest_collection_modifyitems(config, items):
    del config
    for item in items:
        fixtures = set(getattr(item, 'fixturenames', ()))
        heavy = (
            not isinstance(item, pytest.Function)  # notebooks (nbmake)
            or item.get_closest_marker('slow') is not None
            or fixtures & NEEDS_MORE_THAN_THIS_PROCESS.keys()
        )
        item.add_marker(pytest.mark.full if heavy else pytest.mark.fast)


# Programs that library imports run to find shared libraries, not test work.
LIBRARY_PROBES = {'ldconfig', 'gcc', 'cc', 'objdump', 'ld'}


@pytest.fixture(autouse=True)
def _fast_tests_stay_in_this_process(request, monkeypatch):
    if request.node.get_closest_marker('fast') is None:
        return

    real_popen = subprocess.Popen

    def refuse(args, *rest, **kwargs):
        program = os.path.basename(str(args if isinstance(args, (str, bytes)) else args[0]))
        if program in LIBRARY_PROBES:  # ctypes.util.find_library, run by some imports
            return real_popen(args, *rest, **kwargs)
        raise AssertionError(
            f'a fast test started a subprocess ({program}): ask for the run_process fixture '
            '(which puts the test in the full tier)'
        )

    monkeypatch.setattr(subprocess, 'Popen', refuse)


@pytest.fixture
def run_process():
    """run([args...]) -> CompletedProcess: a Python command from the repository root, bounded."""

    def run(argv, *, timeout=300, env=None, cwd=REPO, executable=sys.executable):
        command = [executable, *argv] if executable else list(argv)
        return subprocess.run(
            command,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope='session')
def torch():
    import torch

    return torch


@pytest.fixture(scope='session')
def keras():
    import keras

    return keras


@pytest.fixture(scope='session')
def _gcs_emulator():
    from gcs_emulator import Emulator

    emulator = Emulator()
    yield emulator
    emulator.stop()


@pytest.fixture
def gcs_bucket(_gcs_emulator, monkeypatch, request):
    """gs://BUCKET of a fresh bucket on a real GCS API (fake-gcs-server on 127.0.0.1), with this
    process set up to reach it as a client would; subprocesses inherit the environment."""
    from gcs_emulator import forget_clients, point_clients_at

    point_clients_at(_gcs_emulator, monkeypatch)
    name = ''.join(c if c.isalnum() else '-' for c in request.node.name.lower())
    bucket = f'b-{name}'[:52].rstrip('-')
    _gcs_emulator.create_bucket(bucket)
    yield f'gs://{bucket}'
    forget_clients()
