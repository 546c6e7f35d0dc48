"""How the processes of a run find each other: one decision, made before JAX starts a backend.

    startup = cluster.decide(coordinator_address=..., num_processes=..., process_id=...)
    cluster.start(startup, initialization_timeout=..., heartbeat_timeout_seconds=...)

The first source that says something decides, in this order:
  1. flags: --coordinator_address, --num_processes, --process_id (all three);
  2. JAX_* variables: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (in a
     Kubernetes Indexed Job, e.g. a GKE JobSet, JOB_COMPLETION_INDEX stands for the last);
  3. torchrun-style variables: MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK (under torchrun's
     own agent, which holds MASTER_PORT, the coordinator listens on MASTER_PORT + 1);
  4. the cluster JAX's own detection finds (Cloud TPU VMs from their metadata server, GKE TPU
     pods, SLURM, Open MPI, Kubernetes with the `kubernetes` package), started with
     `jax.distributed.initialize()` wherever it reports more than one process;
  5. one process.
Flags given beside JAX_* or torchrun variables of other values stop the run with one line.
Where nothing above applies but an environment says several processes run (SLURM_NTASKS=4,
several TPU_WORKER_HOSTNAMES, OMPI_COMM_WORLD_SIZE, an Indexed Job's JOB_COMPLETION_INDEX),
the run stops with one line: several processes without a distributed client would each train
alone, save over one another and ignore preemption notices (Orbax asks the client).
Every multi-process start passes `local_device_ids` (resnet_jax.accelerators): a process
started per node takes all of its node's GPUs, one started per GPU takes its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from resnet_jax import accelerators

logger = logging.getLogger(__name__)

# Variables by which launchers say how many processes they started, for the check above.
PROCESS_COUNT_HINTS = (
    'SLURM_NTASKS',
    'SLURM_STEP_NUM_TASKS',
    'OMPI_COMM_WORLD_SIZE',
    'PMI_SIZE',
)
WORKER_LIST_HINTS = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')
JAX_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')
TORCHRUN_VARIABLES = ('MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE', 'RANK')
# Flags and the variables that say the same thing, for the disagreement check.
_SAME_AS_FLAG = {
    'coordinator_address': ('JAX_COORDINATOR_ADDRESS',),
    'num_processes': ('JAX_NUM_PROCESSES', 'WORLD_SIZE'),
    'process_id': ('JAX_PROCESS_ID', 'RANK'),
}


@dataclasses.dataclass(frozen=True)
class Startup:
    """What `start` does: `initialize` is None for one process, else initialize's arguments."""

    how: str  # 'one process', 'flags', 'JAX_* variables', ..., or the JAX cluster found
    processes: int
    initialize: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class _Given:
    """Where the processes meet, as one source says it."""

    how: str
    coordinator: str
    processes: int
    process_id: int


def _count(env: Mapping[str, str], name: str, minimum: int) -> int:
    value = env[name].strip()
    if not value.isdigit() or int(value) < minimum:
        raise ValueError(f'{name}={env[name]!r}; expected an integer >= {minimum}')
    return int(value)


def _missing(env: Mapping[str, str], names: tuple[str, ...], need: str) -> None:
    absent = [n for n in names if not env.get(n, '').strip()]
    if absent:
        raise ValueError(f'{", ".join(absent)} not set; expected {need} (docs/scaling.md)')


def _from_jax_variables(env: Mapping[str, str]) -> _Given | None:
    """JAX_* variables; JOB_COMPLETION_INDEX stands for JAX_PROCESS_ID in an Indexed Job.

    JAX_COORDINATOR_ADDRESS alone is not this source: JAX itself reads it to override the
    coordinator of the cluster its detection finds.
    """
    if not any(n in env for n in JAX_VARIABLES[1:]):
        return None
    index = 'JAX_PROCESS_ID' if 'JAX_PROCESS_ID' in env else 'JOB_COMPLETION_INDEX'
    need = 'JAX_COORDINATOR_ADDRESS=HOST:PORT, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=I together'
    _missing(env, ('JAX_NUM_PROCESSES',), need)
    processes = _count(env, 'JAX_NUM_PROCESSES', 1)
    if processes == 1:
        return _Given('JAX_* variables', '', 1, 0)
    _missing(env, ('JAX_COORDINATOR_ADDRESS', index), need)
    how = 'JAX_* variables' + ('' if index == 'JAX_PROCESS_ID' else ' and JOB_COMPLETION_INDEX')
    return _Given(how, env['JAX_COORDINATOR_ADDRESS'].strip(), processes, _count(env, index, 0))


def _from_torchrun(env: Mapping[str, str]) -> _Given | None:
    """torchrun-style variables (torchrun, Kubeflow's PyTorchJob, many schedulers)."""
    if 'WORLD_SIZE' not in env:
        return None
    processes = _count(env, 'WORLD_SIZE', 1)
    if processes == 1:
        return _Given('torchrun variables', '', 1, 0)
    _missing(env, TORCHRUN_VARIABLES, 'MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK together')
    port = _count(env, 'MASTER_PORT', 1)
    if env.get('JAX_COORDINATOR_PORT', '').strip():
        port = _count(env, 'JAX_COORDINATOR_PORT', 1)
    elif env.get('TORCHELASTIC_RUN_ID'):
        port += 1  # torchrun's agent listens on MASTER_PORT itself
    address = f'{env["MASTER_ADDR"].strip()}:{port}'
    return _Given('torchrun variables', address, processes, _count(env, 'RANK', 0))


def _check_agreement(flags: dict[str, Any], env: Mapping[str, str]) -> None:
    """Flags win, but a launcher's variable that says otherwise is a mistake to name now:
    processes of one run would be told different things."""
    for flag, value in flags.items():
        for name in _SAME_AS_FLAG[flag]:
            said = env.get(name, '').strip()
            if value is not None and said and said != str(value):
                raise ValueError(
                    f'--{flag}={value} but {name}={said}; expected the flags and the '
                    "launcher's variables to agree (or only one of them)"
                )


def _from_flags(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> _Given | None:
    flags = {
        'coordinator_address': coordinator_address,
        'num_processes': num_processes,
        'process_id': process_id,
    }
    if all(v is None for v in flags.values()):
        return None
    missing = [f'--{k}' for k, v in flags.items() if v is None]
    if missing and not (num_processes == 1 and coordinator_address is None):
        raise ValueError(
            f'{", ".join(missing)} not given; expected all three of --coordinator_address, '
            '--num_processes and --process_id, or none of them'
        )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f'--num_processes={num_processes}; expected a count >= 1')
    if process_id is not None and not 0 <= process_id < (num_processes or 1):
        raise ValueError(
            f'--process_id={process_id}; expected 0 <= process_id < --num_processes={num_processes}'
        )
    return _Given('flags', coordinator_address or '', num_processes, process_id or 0)


def _device_ids(env: Mapping[str, str]) -> dict[str, Any]:
    """initialize's local_device_ids, except on a TPU VM (JAX never narrows a TPU host)."""
    from jax._src.clusters import cloud_tpu_cluster

    if cloud_tpu_cluster.running_in_cloud_tpu_vm:
        return {}
    return {'local_device_ids': accelerators.local_device_ids(env)}


def detected_cluster() -> tuple[str, int] | None:
    """(name, process count) of the cluster JAX's own detection finds here, else None.

    Asks each of JAX's cluster kinds in JAX's order, as `jax.distributed.initialize()` will.
    """
    from jax._src import clusters

    for kind in clusters.ClusterEnv._cluster_types:
        if kind.opt_in_only_method:
            continue  # e.g. mpi4py: only when asked for by name
        try:
            present = kind.is_env_present()
        except Exception as e:
            logger.warning('cluster detection: %s failed (%s); skipping it', kind.__name__, e)
            continue
        if present:
            return kind.__name__, int(kind.get_process_count())
    return None


def expected_processes(env: Mapping[str, str]) -> tuple[int, str] | None:
    """(count, 'VAR=value') when a launcher's variable says more than one process runs."""
    for name in PROCESS_COUNT_HINTS:
        value = env.get(name, '')
        if value.isdigit() and int(value) > 1:
            return int(value), f'{name}={value}'
    for name in WORKER_LIST_HINTS:
        workers = [w for w in env.get(name, '').split(',') if w]
        if len(workers) > 1:
            return len(workers), f'{name} lists {len(workers)} hosts'
    return None


def _refuse_unconnected(env: Mapping[str, str]) -> None:
    """Stops a start that would leave processes of one run each training alone."""
    hint = expected_processes(env)
    if hint:
        raise ValueError(
            f'{hint[1]} says {hint[0]} processes run, but JAX detects no cluster here to '
            'connect them; pass --coordinator_address=HOST:PORT --num_processes=N '
            '--process_id=I to each process, or set the JAX_* variables (docs/scaling.md)'
        )
    if 'JOB_COMPLETION_INDEX' in env:
        raise ValueError(
            f'JOB_COMPLETION_INDEX={env["JOB_COMPLETION_INDEX"]}: a pod of a Kubernetes '
            'Indexed Job, but nothing says how many processes run or where process 0 is; set '
            'JAX_COORDINATOR_ADDRESS=<first pod>.<subdomain>:PORT and JAX_NUM_PROCESSES=N in '
            'the pod template, or JAX_NUM_PROCESSES=1 for independent runs (docs/scaling.md)'
        )


def decide(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Startup:
    """How this process starts. Raises ValueError for flags or environments that cannot work."""
    env = os.environ if env is None else env
    flags = {
        'coordinator_address': coordinator_address,
        'num_processes': num_processes,
        'process_id': process_id,
    }
    given = _from_flags(**flags)
    if given:
        _check_agreement(flags, env)
    given = given or _from_jax_variables(env) or _from_torchrun(env)
    if given and given.processes == 1:
        return Startup('one process', 1, None)
    if given:
        arguments = {
            'coordinator_address': given.coordinator,
            'num_processes': given.processes,
            'process_id': given.process_id,
            **_device_ids(env),
        }
        return Startup(given.how, given.processes, arguments)
    found = detected_cluster()
    if found and found[1] > 1:
        return Startup(found[0], found[1], _device_ids(env))  # JAX detects the rest again
    _refuse_unconnected(env)
    return Startup('one process', 1, None)


def start(startup: Startup, **timeouts: Any) -> None:
    """Connects the processes as decided (nothing for one process)."""
    if startup.initialize is None:
        return
    import jax

    ids = startup.initialize.get('local_device_ids')
    devices = f', local devices {ids}' if ids else ''
    logger.info('starting %d processes (%s%s)', startup.processes, startup.how, devices)
    jax.distributed.initialize(**startup.initialize, **timeouts)
