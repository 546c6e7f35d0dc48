"""Device mesh, partition rules for the train state, and batch placement.

One `Mesh` over every device of every process, with the batch axis named `data`. Each process
feeds only its own rows of the global batch; `global_batch` stitches them into global
`jax.Array`s sharded over `data`, identically on one process or many.

The train state is replicated by default (data parallelism). With the `fsdp` rule, every
array of at least `fsdp_min_size` elements is split over `data` along its largest evenly
divisible axis, as in ZeRO-3 / FSDP: XLA inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax import options

DATA_AXIS = 'data'

logger = logging.getLogger('resnet_jax')


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) with axis `data`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def state_shardings(
    abstract_state: Any, mesh: Mesh, *, fsdp: bool = False, fsdp_min_size: int = 2**18
) -> Any:
    """A NamedSharding for every leaf of the (abstract) train state."""
    replicated = NamedSharding(mesh, PartitionSpec())
    n = mesh.shape[DATA_AXIS]

    def rule(leaf):
        if not fsdp or leaf.size < fsdp_min_size:
            return replicated
        for axis in sorted(range(leaf.ndim), key=lambda a: -leaf.shape[a]):
            if leaf.shape[axis] % n == 0:
                spec = [None] * leaf.ndim
                spec[axis] = DATA_AXIS
                return NamedSharding(mesh, PartitionSpec(*spec))
        return replicated

    return jax.tree.map(rule, abstract_state)


def check_batch_size(batch_size: Any, devices: int, processes: int) -> None:
    """Raises ValueError unless `batch_size` splits evenly over the devices and processes
    (else some device would get a ragged shard). The message continues 'batch_size=N ...'."""
    if not options.is_int(batch_size) or batch_size < 1:
        raise ValueError('is not a positive int')
    for count, what in ((devices, 'devices'), (processes, 'processes')):
        if batch_size % count:
            raise ValueError(
                f'is not divisible by the {count} {what}; expected a multiple of {count}'
            )


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
    """This process's share of the global batch; raises ValueError unless it divides evenly."""
    mesh = data_mesh() if mesh is None else mesh
    try:
        check_batch_size(global_batch_size, mesh.devices.size, jax.process_count())
    except ValueError as e:
        raise ValueError(f'batch_size {global_batch_size!r} {e}') from None
    return global_batch_size // jax.process_count()


def eval_batch_size(requested: int, devices: int, processes: int = 1) -> int:
    """The eval batch `requested` becomes on `devices`: the smallest multiple of the device
    count (and of the process count, which divides it on every real cluster) that is at least
    `requested`. An eval batch is padded and masked anyway, so rounding it up changes no
    metric, where refusing it would stop a config on a larger slice (512 on 1,024 devices)."""
    unit = math.lcm(devices, processes)
    return -(-requested // unit) * unit


@functools.cache
def note_eval_batch_size(requested: int, devices: int, processes: int) -> int:
    """`eval_batch_size(...)`, logged (on process 0, once per process) where it differs."""
    effective = eval_batch_size(requested, devices, processes)
    if effective != requested and jax.process_index() == 0:
        logger.info(
            'eval_batch_size=%d is used as %d: the smallest multiple of the %d devices at least '
            'as large (padded examples are masked out)',
            requested,
            effective,
            devices,
        )
    return effective


def local_eval_batch_size(requested: int, mesh: Mesh | None = None) -> int:
    """This process's share of the eval batch `requested` becomes on `mesh` (rounded up to
    the devices: `eval_batch_size`)."""
    mesh = data_mesh() if mesh is None else mesh
    effective = note_eval_batch_size(requested, mesh.devices.size, jax.process_count())
    return local_batch_size(effective, mesh)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles each process's rows into global arrays sharded over the `data` axis."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
