"""Which accelerators each process of a run takes, and the start-up checks that it got them.

Before JAX starts a backend, `cluster.decide` asks `local_device_ids(env)`: the devices this
process takes, as `jax.distributed.initialize`'s `local_device_ids`. A launcher that starts one
process per node gives it all of the node's GPUs; one that starts several per node gives each
an equal share (one each, usually); a launcher that already gave each process GPUs of its own
(CUDA_VISIBLE_DEVICES narrower than the node's SLURM_GPUS_ON_NODE) leaves them all to it.
JAX's own SLURM and Open MPI detection would instead give every process the one GPU of its
local rank, also when a node runs one process: 4 nodes x 8 GPUs would train on 4 devices.

At start-up, before anything is written, `check_start(require_backend)` stops the run with one
line when JAX runs on another backend than the one asked for (the config's `require_backend`,
or JAX_PLATFORMS=cuda/tpu), naming the plugin and driver problem; or when this process sees
another number of accelerators than its launcher gave it (CUDA_VISIBLE_DEVICES,
SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE shared by the node's processes, or the TPU chips on
a TPU VM's PCI bus).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import re
from collections.abc import Mapping

BACKENDS = ('', 'gpu', 'tpu')  # config `require_backend`: '' = whatever JAX finds
# The NVIDIA driver each CUDA plugin needs (JAX's installation notes).
MIN_DRIVER = {'jax-cuda13-plugin': 580, 'jax-cuda12-plugin': 525}
_PLATFORM_BACKEND = {'cuda': 'gpu', 'gpu': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu'}
_DRIVER_FILE = '/proc/driver/nvidia/version'
# Devices per TPU chip, by version: v2 and v3 show each of a chip's two cores as a device.
_TPU_DEVICES_PER_CHIP = {'v2': 2, 'v3': 2, 'v4': 1, 'v5p': 1, 'v5e': 1, 'v6e': 1}


@dataclasses.dataclass(frozen=True)
class Layout:
    """The processes of the run on this node: how many (None: unknown), and which this is."""

    processes: int | None
    rank: int
    source: str


@dataclasses.dataclass(frozen=True)
class Share:
    """The GPUs this process takes: `ids` for local_device_ids ([] = all it sees), and how many
    it should then see where the environment says (`expected`, with `why`)."""

    ids: list[int]
    expected: int | None
    why: str


@dataclasses.dataclass(frozen=True)
class Expected:
    """The accelerators this process should see."""

    platform: str  # 'gpu' | 'tpu' (jax.default_backend()'s names)
    count: int
    why: str


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name].strip()
    if not value.isdigit():
        raise ValueError(f'{name}={env[name]!r}; expected a non-negative integer')
    return int(value)


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks of this SLURM step on this node, from '2(x3),1'-style lists indexed by
    SLURM_NODEID; else SLURM_NTASKS_PER_NODE; else tasks / nodes where that divides."""
    listed = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE')
    if listed and env.get('SLURM_NODEID', '').isdigit():
        counts = []
        for part in listed.split(','):
            match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
            if not match:
                return None
            counts += [int(match[1])] * int(match[2] or 1)
        node = int(env['SLURM_NODEID'])
        return counts[node] if node < len(counts) else None
    if env.get('SLURM_NTASKS_PER_NODE', '').isdigit():
        return int(env['SLURM_NTASKS_PER_NODE'])
    tasks = env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS', '')
    nodes = env.get('SLURM_STEP_NUM_NODES') or env.get('SLURM_NNODES', '')
    if tasks.isdigit() and nodes.isdigit() and int(nodes) and int(tasks) % int(nodes) == 0:
        return int(tasks) // int(nodes)
    return None


def node_layout(env: Mapping[str, str]) -> Layout:
    """How the launcher placed the run's processes on this node: torchrun's, Open MPI's or
    SLURM's local rank and size; one process where none of them says."""
    for size, rank in (
        ('LOCAL_WORLD_SIZE', 'LOCAL_RANK'),
        ('OMPI_COMM_WORLD_LOCAL_SIZE', 'OMPI_COMM_WORLD_LOCAL_RANK'),
    ):
        if size in env and rank in env:
            where = f'{rank}={env[rank]} of {size}={env[size]}'
            return Layout(_int(env, size), _int(env, rank), where)
    if 'SLURM_LOCALID' in env:
        tasks = _slurm_tasks_on_node(env)
        where = f'SLURM_LOCALID={env["SLURM_LOCALID"]} of {tasks or "?"} tasks on this node'
        return Layout(tasks, _int(env, 'SLURM_LOCALID'), where)
    return Layout(1, 0, 'one process on this node')


def visible_gpus(env: Mapping[str, str]) -> int | None:
    """GPUs CUDA_VISIBLE_DEVICES lets this process see; None where it is not set."""
    if 'CUDA_VISIBLE_DEVICES' not in env:
        return None
    count = 0
    for entry in env['CUDA_VISIBLE_DEVICES'].split(','):
        entry = entry.strip()
        # CUDA stops at the first invalid entry; SLURM writes NoDevFiles for none.
        if not entry or entry.startswith('-') or entry == 'NoDevFiles':
            break
        count += 1
    return count


def node_gpus(env: Mapping[str, str]) -> tuple[int, str] | None:
    """(GPUs SLURM gave this node, 'VAR=value'), from SLURM_GPUS_ON_NODE or
    SLURM_GPUS_PER_NODE ('8' or 'a100:8'); None where neither says."""
    for name in ('SLURM_GPUS_ON_NODE', 'SLURM_GPUS_PER_NODE'):
        count = env.get(name, '').rsplit(':', 1)[-1]
        if count.isdigit() and int(count) > 0:
            return int(count), f'{name}={env[name]}'
    return None


def gpu_share(env: Mapping[str, str]) -> Share:
    """The GPUs this process takes, from its node's layout and GPU counts.

    Raises:
      ValueError: the node's processes cannot share its GPUs evenly.
    """
    layout = node_layout(env)
    visible, node = visible_gpus(env), node_gpus(env)
    shown = f'CUDA_VISIBLE_DEVICES={env.get("CUDA_VISIBLE_DEVICES")}'
    if layout.processes == 1:
        if visible is not None:
            return Share([], visible or None, f'{shown}, one process on this node')
        if node:
            return Share([], node[0], f'{node[1]}, one process on this node')
        return Share([], None, 'one process on this node')
    if visible and node and visible < node[0]:
        # The launcher bound these to this process (srun --gpus-per-task, --gpu-bind).
        return Share([], visible, f"{shown} of {node[1]}: this task's own")
    seen, source = (visible, shown) if visible else node or (None, '')
    if not seen or layout.processes is None:
        return Share([layout.rank], None, layout.source)  # one each: JAX's own default
    if seen % layout.processes:
        raise ValueError(
            f'{layout.processes} processes on this node cannot share its {seen} GPUs '
            f'({source}) evenly; expected a number of processes per node that divides it'
        )
    each = seen // layout.processes
    ids = list(range(layout.rank * each, (layout.rank + 1) * each))
    return Share(ids, each, f'{source} shared by {layout.processes} processes, {layout.source}')


def local_device_ids(env: Mapping[str, str]) -> list[int]:
    """The devices this process takes, for jax.distributed.initialize's local_device_ids.

    [] is every device the process sees: unlike None, it keeps JAX's SLURM and Open MPI
    detection from narrowing a process to the one GPU of its local rank. JAX_LOCAL_DEVICE_IDS,
    which JAX reads itself, is the user's own choice and wins.
    """
    if env.get('JAX_LOCAL_DEVICE_IDS'):
        ids = env['JAX_LOCAL_DEVICE_IDS'].split(',')
        if not all(i.strip().isdigit() for i in ids):
            raise ValueError(
                f'JAX_LOCAL_DEVICE_IDS={env["JAX_LOCAL_DEVICE_IDS"]!r}; expected device '
                'numbers separated by commas, e.g. 0,1'
            )
        return [int(i) for i in ids]
    return gpu_share(env).ids


def _platform_excluded(env: Mapping[str, str], platform: str) -> bool:
    """JAX_PLATFORMS names platforms and not this one (e.g. 'cpu' on a GPU node, on purpose)."""
    named = [p.strip().lower() for p in env.get('JAX_PLATFORMS', '').split(',') if p.strip()]
    return bool(named) and platform not in {_PLATFORM_BACKEND.get(p, p) for p in named}


def tpu_devices(chips: int, version: str | None, env: Mapping[str, str]) -> Expected | None:
    """The TPU devices of a host with `chips` chips of `version` on its PCI bus (TPU_VISIBLE_CHIPS
    narrows them); None where no chip is found or the version's cores per chip are unknown."""
    if env.get('TPU_VISIBLE_CHIPS'):
        chips = len([c for c in env['TPU_VISIBLE_CHIPS'].split(',') if c.strip()])
    per_chip = _TPU_DEVICES_PER_CHIP.get(version or '')
    if not chips or not per_chip:
        return None
    return Expected('tpu', chips * per_chip, f'{chips} TPU {version} chips on this host')


def expected_devices(
    env: Mapping[str, str], tpu: tuple[int, str | None] = (0, None)
) -> Expected | None:
    """The accelerators this process should see, where its environment says; None otherwise,
    and where JAX_PLATFORMS deliberately leaves that platform out."""
    share = gpu_share(env)
    if share.expected and not _platform_excluded(env, 'gpu'):
        return Expected('gpu', share.expected, share.why)
    found = tpu_devices(*tpu, env)
    if found and not _platform_excluded(env, 'tpu'):
        return found
    return None


def required_backend(setting: str, env: Mapping[str, str]) -> str:
    """The backend a run must have: `setting` (config `require_backend`), else the one
    JAX_PLATFORMS asks for first (cuda -> gpu, tpu), else '' (any)."""
    if setting not in BACKENDS:
        raise ValueError(f"require_backend={setting!r}; expected '', 'gpu' or 'tpu'")
    platforms = env.get('JAX_PLATFORMS', '')
    implied = _PLATFORM_BACKEND.get(platforms.split(',')[0].strip().lower(), '')
    if setting and implied and setting != implied:
        raise ValueError(
            f'require_backend={setting!r} but JAX_PLATFORMS={platforms!r} asks for {implied}; '
            'expected them to agree'
        )
    return setting or implied


def _driver_major(driver: str | None) -> int | None:
    return int(driver.split('.')[0]) if driver else None


def _gpu_cause(plugins: Mapping[str, str], driver: str | None) -> str:
    """Why the CUDA plugin did not give JAX its GPUs, from what is installed and the driver."""
    cuda = {k: v for k, v in plugins.items() if k in MIN_DRIVER}
    if not cuda:
        return (
            "no CUDA plugin is installed: pip install 'resnet_jax[gpu]' (CUDA 13, NVIDIA "
            "driver >= 580) or 'resnet_jax[cuda12]' (driver >= 525)"
        )
    if driver is None:
        return (
            f'the CUDA plugin did not load: no NVIDIA driver found ({_DRIVER_FILE} is '
            "missing): run on a GPU node, or give the container its GPUs (NVIDIA's runtime)"
        )
    for name, version in sorted(cuda.items(), reverse=True):
        if _driver_major(driver) < MIN_DRIVER[name]:
            fix = (
                "install the cuda12 extra: pip install 'resnet_jax[cuda12]'"
                if name == 'jax-cuda13-plugin'
                else 'update the NVIDIA driver'
            )
            return (
                f'the CUDA plugin did not load ({name} {version} needs NVIDIA driver >= '
                f'{MIN_DRIVER[name]}, this machine has {driver}; {fix})'
            )
    names = ', '.join(f'{k} {v}' for k, v in sorted(cuda.items()))
    return (
        f"the CUDA plugin did not load ({names}, NVIDIA driver {driver}): see JAX's "
        'warning above for why'
    )


def _tpu_cause(plugins: Mapping[str, str]) -> str:
    if 'libtpu' not in plugins:
        return "the TPU runtime is not installed: pip install 'jax[tpu]'"
    return (
        f'the TPU runtime (libtpu {plugins["libtpu"]}) did not start: another process may '
        "hold the TPU (only one may use it at a time), see JAX's warning above"
    )


def backend_cause(required: str, plugins: Mapping[str, str], driver: str | None) -> str:
    """Why JAX is not on the `required` backend ('gpu' or 'tpu'), with what to do."""
    return _gpu_cause(plugins, driver) if required == 'gpu' else _tpu_cause(plugins)


def backend_problem(
    required: str, backend: str, plugins: Mapping[str, str], driver: str | None
) -> str | None:
    """One line if JAX's `backend` is not the `required` one ('' = any), else None."""
    if not required or backend == required:
        return None
    return f'this run requires backend {required} but JAX runs on {backend}: ' + backend_cause(
        required, plugins, driver
    )


def device_problem(
    expected: Expected | None,
    backend: str,
    count: int,
    plugins: Mapping[str, str],
    driver: str | None,
) -> str | None:
    """One line if this process does not see the accelerators it should, else None."""
    if expected is None or (backend, count) == (expected.platform, expected.count):
        return None
    should = f'this process should see {expected.count} {expected.platform.upper()}s'
    if backend != expected.platform:
        cause = backend_cause(expected.platform, plugins, driver)
        return f'{should} ({expected.why}) but JAX runs on {backend}: {cause}'
    return (
        f'{should} ({expected.why}) but JAX sees {count}: expected the processes per node and '
        'the GPUs per process to agree with what the launcher gave (docs/scaling.md, '
        '"Which devices each process takes")'
    )


def installed_plugins() -> dict[str, str]:
    """The accelerator plugins installed beside JAX, with their versions."""
    found = {}
    for name in (*MIN_DRIVER, 'libtpu'):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def nvidia_driver(path: str = _DRIVER_FILE) -> str | None:
    """The NVIDIA kernel driver's version ('570.86.15'), read without CUDA; None if absent."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(r'NVRM version:.*?\s(\d+\.\d+(?:\.\d+)?)\s', text)
    return match[1] if match else None


def _tpu_chips() -> tuple[int, str | None]:
    """TPU chips on this host's PCI bus and their version, as JAX's TPU start-up finds them."""
    from jax._src import hardware_utils

    chips, version = hardware_utils.num_available_tpu_chips_and_device_id()
    return chips, version.name if version is not None else None


def check_start(require_backend: str, env: Mapping[str, str] | None = None) -> None:
    """Stops the run (ValueError, one line) if JAX is not on the required backend or this
    process does not see the accelerators its launcher gave it. Starts JAX's backend."""
    import jax

    env = os.environ if env is None else env
    required = required_backend(require_backend, env)
    try:
        backend, count = jax.default_backend(), jax.local_device_count()
    except RuntimeError as e:  # JAX_PLATFORMS named a platform that failed to start
        if not required:
            raise
        cause = backend_cause(required, installed_plugins(), nvidia_driver())
        raise ValueError(
            f'this run requires backend {required} but JAX could not start it '
            f'({str(e).splitlines()[0][:200]}): {cause}'
        ) from None
    plugins, driver = installed_plugins(), nvidia_driver()
    problem = backend_problem(required, backend, plugins, driver) or device_problem(
        expected_devices(env, _tpu_chips()), backend, count, plugins, driver
    )
    if problem:
        raise ValueError(problem)
