"""Test set-up: 8 simulated CPU devices, Keras on JAX, and the real CIFAR-10 on disk.

The environment variables must be set before JAX (or Keras) is first imported, which is why
they live here, at the top of the first module pytest loads.
"""

import os
import pathlib
import shutil
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
    if not marker.exists():
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
