"""Where XLA's persistent compilation cache lives, and turning it on.

A restarted run skips compiling what it compiled before (config `compilation_cache_dir`:
'auto', a path, or '' = off). JAX writes cache entries from process 0 only (jax 0.10.2,
`jax/_src/compiler.py::_cache_write`: other processes would contend for the same files on
stores such as GCS), so a cache on each host's local disk is filled on process 0's host alone
and every other host compiles again at each restart. 'auto' therefore means, for a run of
several processes, WORKDIR/xla_cache: a path every host of the run reads (local, NFS or
gs://, which JAX's cache reads and writes through etils.epath); a run of one process keeps its
local default, <cache dir>/xla (RESNET_JAX_CACHE_DIR, default ~/.cache/resnet_jax).
Every host hits it where JAX's cache key of a multi-process computation is the same on every
process: JAX builds GPU keys so (jax/_src/cache_key.py); on the CPU backend (gloo) the key's
topology fingerprint differs per process, so there only process 0 hits (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import os

from resnet_jax import paths

WORKDIR_CACHE = 'xla_cache'  # under the workdir, for runs of several processes


@dataclasses.dataclass(frozen=True)
class Location:
    """Where the cache goes (None: off), and whether that is inside the run's workdir."""

    path: str | None
    in_workdir: bool = False


def location(setting: str, workdir: str, process_count: int) -> Location:
    """The cache of a run: `setting` ('auto', a path, '' = off) for `process_count` processes."""
    if not setting:
        return Location(None)
    if setting == 'auto' and process_count > 1:
        return Location(paths.join(paths.normalize(workdir), WORKDIR_CACHE), in_workdir=True)
    if setting == 'auto':
        return Location(os.path.join(paths.cache_dir(), 'xla'))
    return Location(setting if paths.is_url(setting) else os.path.expanduser(setting))


def enable(path: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `path` (None: leaves it as it is).

    Takes effect for the compilations after it, also when some ran before: JAX opens the
    cache at the first compilation that finds a path set.
    """
    if path is None:
        return None
    import jax

    jax.config.update('jax_compilation_cache_dir', path)
    # Steps compile in seconds to minutes; the many tiny eager ops are not worth a file each.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    return path
