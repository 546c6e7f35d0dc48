"""How the processes of a run find each other: one decision, made before JAX starts a backend.

    startup = cluster.decide(coordinator_address=..., num_processes=..., process_id=...)
    cluster.start(startup, initialization_timeout=..., heartbeat_timeout_seconds=...)

In order: explicit flags; else the cluster JAX's own detection finds (Cloud TPU VMs from their
metadata server, GKE TPU pods, SLURM, Open MPI, Kubernetes jobs), started with
`jax.distributed.initialize()` and no arguments wherever it reports more than one process;
else one process. An environment that says several processes run (SLURM_NTASKS=4, several
TPU_WORKER_HOSTNAMES, OMPI_COMM_WORLD_SIZE) when nothing above applies stops the run with one
line: several processes without a distributed client would each train alone, save over one
another and ignore preemption notices (Orbax asks the client).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

# Variables by which launchers say how many processes they started, for the check above.
PROCESS_COUNT_HINTS = (
    'SLURM_NTASKS',
    'SLURM_STEP_NUM_TASKS',
    'OMPI_COMM_WORLD_SIZE',
    'PMI_SIZE',
    'WORLD_SIZE',
)
WORKER_LIST_HINTS = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')


@dataclasses.dataclass(frozen=True)
class Startup:
    """What `start` does: `initialize` is None for one process, else initialize's arguments."""

    how: str  # 'one process', 'flags', or the JAX cluster found ('SlurmCluster', ...)
    processes: int
    initialize: dict[str, Any] | None


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


def decide(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Startup:
    """How this process starts. Raises ValueError for flags or environments that cannot work."""
    env = os.environ if env is None else env
    flags_given = {
        'coordinator_address': coordinator_address,
        'num_processes': num_processes,
        'process_id': process_id,
    }
    if any(v is not None for v in flags_given.values()):
        missing = [f'--{k}' for k, v in flags_given.items() if v is None]
        if missing and not (num_processes == 1 and coordinator_address is None):
            raise ValueError(
                f'{", ".join(missing)} not given; expected all three of --coordinator_address, '
                '--num_processes and --process_id, or none of them on a cluster JAX detects'
            )
        if num_processes is not None and num_processes < 1:
            raise ValueError(f'--num_processes={num_processes}; expected a count >= 1')
        if process_id is not None and not 0 <= process_id < (num_processes or 1):
            raise ValueError(
                f'--process_id={process_id}; expected 0 <= process_id < --num_processes='
                f'{num_processes}'
            )
        if num_processes == 1:
            return Startup('one process', 1, None)
        return Startup('flags', num_processes, flags_given)
    found = detected_cluster()
    if found and found[1] > 1:
        return Startup(found[0], found[1], {})  # JAX detects it again inside initialize()
    hint = expected_processes(env)
    if hint:
        raise ValueError(
            f'{hint[1]} says {hint[0]} processes run, but JAX detects no cluster here to '
            'connect them; pass --coordinator_address=HOST:PORT --num_processes=N '
            '--process_id=I to each process (docs/scaling.md)'
        )
    return Startup('one process', 1, None)


def start(startup: Startup, **timeouts: Any) -> None:
    """Connects the processes as decided (nothing for one process)."""
    if startup.initialize is None:
        return
    import jax

    logger.info('starting %d processes (%s)', startup.processes, startup.how)
    jax.distributed.initialize(**startup.initialize, **timeouts)
