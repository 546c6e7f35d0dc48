"""The backend a run asked for and the accelerators each process should see
(resnet_jax.accelerators). How launchers lay processes out on nodes is in tests/test_cluster.py.

This machine has no accelerator: JAX runs on the CPU, so every run that requires a GPU or TPU
here is one that must stop, which check_start is tested on; the plugin and driver of a GPU
machine are given to the pure functions that word the line.
"""

import re

import pytest

from configs import imagenet
from resnet_jax import accelerators
from resnet_jax import config as config_lib

CUDA13 = {'jax-cuda13-plugin': '0.10.2'}


def test_a_run_that_requires_a_gpu_stops_on_this_cpu_with_one_line():
    with pytest.raises(ValueError) as e:
        accelerators.check_start('gpu', env={})
    line = str(e.value)
    assert '\n' not in line
    assert line.startswith('this run requires backend gpu but JAX runs on cpu: ')
    # What this machine lacks, named: no plugin, or (with one) no driver.
    assert 'no CUDA plugin is installed' in line or 'no NVIDIA driver found' in line


def test_a_run_that_requires_a_tpu_stops_on_this_cpu():
    with pytest.raises(ValueError, match=r'^this run requires backend tpu but JAX runs on cpu: '):
        accelerators.check_start('tpu', env={})


def test_jax_platforms_cuda_implies_the_requirement():
    assert accelerators.required_backend('', {'JAX_PLATFORMS': 'cuda'}) == 'gpu'
    assert accelerators.required_backend('', {'JAX_PLATFORMS': 'tpu,cpu'}) == 'tpu'
    assert accelerators.required_backend('', {'JAX_PLATFORMS': 'cpu'}) == ''
    assert accelerators.required_backend('gpu', {}) == 'gpu'
    with pytest.raises(ValueError, match=r"^require_backend='tpu' but JAX_PLATFORMS='cuda'"):
        accelerators.required_backend('tpu', {'JAX_PLATFORMS': 'cuda'})


def test_no_requirement_and_no_accelerator_expected_starts_here():
    accelerators.check_start('', env={})
    # GPUs listed but JAX_PLATFORMS=cpu: the CPU on purpose.
    accelerators.check_start('', env={'CUDA_VISIBLE_DEVICES': '0,1', 'JAX_PLATFORMS': 'cpu'})


def test_gpus_listed_but_jax_on_the_cpu_stops_without_any_requirement():
    """A driver too old for the CUDA 13 plugin: JAX falls back to the CPU with a warning."""
    with pytest.raises(ValueError, match=r'^this process should see 2 GPUs \(CUDA_VISIBLE_DEVIC'):
        accelerators.check_start('', env={'CUDA_VISIBLE_DEVICES': '0,1'})


@pytest.mark.parametrize(
    'plugins, driver, cause',
    [
        (
            CUDA13,
            '570.86.15',
            'the CUDA plugin did not load (jax-cuda13-plugin 0.10.2 needs NVIDIA driver >= 580, '
            'this machine has 570.86.15; install the cuda12 extra: pip install '
            "'resnet_jax[cuda12]')",
        ),
        (
            {},
            '580.65.06',
            "no CUDA plugin is installed: pip install 'resnet_jax[gpu]' (CUDA 13, NVIDIA driver "
            ">= 580) or 'resnet_jax[cuda12]' (driver >= 525)",
        ),
        (CUDA13, None, 'the CUDA plugin did not load: no NVIDIA driver found'),
        (
            {'jax-cuda12-plugin': '0.10.2'},
            '470.57.02',
            'jax-cuda12-plugin 0.10.2 needs NVIDIA driver >= 525, this machine has 470.57.02; '
            'update the NVIDIA driver',
        ),
        (CUDA13, '580.65.06', "NVIDIA driver 580.65.06): see JAX's warning above"),
    ],
)
def test_the_line_names_the_plugin_and_driver_problem(plugins, driver, cause):
    line = accelerators.backend_problem('gpu', 'cpu', plugins, driver)
    assert line.startswith('this run requires backend gpu but JAX runs on cpu: ')
    assert cause in line


def test_the_right_backend_is_no_problem():
    assert accelerators.backend_problem('gpu', 'gpu', CUDA13, '580.65.06') is None
    assert accelerators.backend_problem('', 'cpu', {}, None) is None


def test_the_tpu_line_names_the_runtime():
    line = accelerators.backend_problem('tpu', 'cpu', {}, None)
    assert line.endswith("the TPU runtime is not installed: pip install 'jax[tpu]'")
    line = accelerators.backend_problem('tpu', 'cpu', {'libtpu': '0.0.30'}, None)
    assert 'another process may hold the TPU' in line


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path):
    version = tmp_path / 'version'
    version.write_text(
        'NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  '
        '(dvs-builder@U16-I1-N07-12-3)  Thu Jan 23 00:00:00 UTC 2025\nGCC version:  gcc 12.3.0\n'
    )
    assert accelerators.nvidia_driver(str(version)) == '570.86.15'
    assert accelerators.nvidia_driver(str(tmp_path / 'absent')) is None


@pytest.mark.parametrize(
    'value, count',
    [('0,1,2,3', 4), ('', 0), ('GPU-8f3e,GPU-11aa', 2), ('0,1,-1,3', 2), ('NoDevFiles', 0)],
)
def test_cuda_visible_devices_counts_as_cuda_does(value, count):
    assert accelerators.visible_gpus({'CUDA_VISIBLE_DEVICES': value}) == count


def test_slurm_gpu_counts_are_read_with_or_without_their_type():
    typed = {'SLURM_GPUS_PER_NODE': 'h100:8'}
    assert accelerators.node_gpus(typed) == (8, 'SLURM_GPUS_PER_NODE=h100:8')
    assert accelerators.node_gpus({'SLURM_GPUS_ON_NODE': '4'})[0] == 4
    assert accelerators.node_gpus({}) is None


def test_a_tpu_hosts_devices_follow_its_chips():
    assert accelerators.tpu_devices(4, 'v4', {}).count == 4
    assert accelerators.tpu_devices(4, 'v3', {}).count == 8  # two cores per chip, each a device
    assert accelerators.tpu_devices(4, 'v5e', {'TPU_VISIBLE_CHIPS': '0,1'}).count == 2
    assert accelerators.tpu_devices(0, None, {}) is None
    assert accelerators.tpu_devices(4, 'tpu7x', {}) is None  # not known here: not checked
    expected = accelerators.expected_devices({}, tpu=(4, 'v4'))
    line = accelerators.device_problem(expected, 'cpu', 1, {}, None)
    assert line.startswith('this process should see 4 TPUs (4 TPU v4 chips on this host) but JAX')


def test_jax_local_device_ids_is_the_users_choice():
    env = {'CUDA_VISIBLE_DEVICES': '0,1,2,3', 'LOCAL_WORLD_SIZE': '2', 'LOCAL_RANK': '0'}
    assert accelerators.local_device_ids(env) == [0, 1]
    assert accelerators.local_device_ids({**env, 'JAX_LOCAL_DEVICE_IDS': '2,3'}) == [2, 3]
    with pytest.raises(ValueError, match=r"^JAX_LOCAL_DEVICE_IDS='a'; expected device numbers"):
        accelerators.local_device_ids({'JAX_LOCAL_DEVICE_IDS': 'a'})


def test_require_backend_is_validated_with_the_config():
    config = config_lib.base_config()
    config.require_backend = 'cuda'
    message = "invalid config: require_backend='cuda'; expected '' (any), 'gpu' or 'tpu'"
    with pytest.raises(ValueError, match=f'^{re.escape(message)}$'):
        config_lib.validate(config, device_count=8, process_count=1)


def test_the_imagenet_pod_and_gpu_recipes_require_their_accelerator():
    config = imagenet.get_config('resnet50,modern,tpu')
    assert (config.require_backend, config.dtype) == ('tpu', 'bfloat16')
    assert imagenet.get_config('resnet50,gpu').require_backend == 'gpu'
    assert imagenet.get_config('resnet50,modern').require_backend == ''
    with pytest.raises(ValueError, match=r"unknown or repeated part 'cuda' of 'resnet50,cuda'"):
        imagenet.get_config('resnet50,cuda')


def test_a_run_on_the_wrong_backend_stops_before_anything_is_written(tmp_path):
    from configs import smoke
    from resnet_jax import trainer

    config = smoke.get_config()
    with config.unlocked():
        config.require_backend = 'gpu'
    workdir = tmp_path / 'run'
    with pytest.raises(ValueError, match=r'^this run requires backend gpu but JAX runs on cpu'):
        trainer.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()
