"""Where XLA's persistent compilation cache goes (resnet_jax.compilation_cache).

JAX writes cache entries from process 0 only, so a run of several processes takes a cache every
host reads (WORKDIR/xla_cache) and a run of one keeps its local default. How much a warm cache
saves at a restart is measured by benchmarks/restart_time.py (BENCHMARKS.md).
"""

import os
import textwrap

import jax
import pytest

from resnet_jax import compilation_cache


@pytest.mark.parametrize(
    'setting, workdir, processes, expected, in_workdir',
    [
        ('auto', '/runs/r50', 1, '{cache}/xla', False),
        ('auto', '/runs/r50', 8, '/runs/r50/xla_cache', True),
        ('auto', 'gs://bucket/runs/r50/', 8, 'gs://bucket/runs/r50/xla_cache', True),
        ('~/xla_here', '/runs/r50', 8, '{home}/xla_here', False),
        ('gs://b/xla', '/runs/r50', 8, 'gs://b/xla', False),
        ('', '/runs/r50', 8, None, False),
    ],
)
def test_a_run_of_several_processes_caches_under_its_workdir(
    monkeypatch, tmp_path, setting, workdir, processes, expected, in_workdir
):
    monkeypatch.setenv('RESNET_JAX_CACHE_DIR', str(tmp_path))
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    found = compilation_cache.location(setting, workdir, processes)
    if expected is not None:
        expected = expected.format(cache=tmp_path, home=tmp_path / 'home')
    assert found == compilation_cache.Location(expected, in_workdir)


def test_enable_points_jax_at_the_path_and_none_leaves_it():
    before = jax.config.jax_compilation_cache_dir
    try:
        assert compilation_cache.enable('/tmp/somewhere') == '/tmp/somewhere'
        assert jax.config.jax_compilation_cache_dir == '/tmp/somewhere'
    finally:
        jax.config.update('jax_compilation_cache_dir', before)
    assert compilation_cache.enable(None) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_a_cache_enabled_after_the_first_compilations_still_fills(tmp_path, run_process):
    """trainer.build_run turns a workdir's cache on once the run's record is written, after
    the workdir's lock and the state were compiled for: the steps compiled later are cached."""
    cache = tmp_path / 'xla_cache'
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from resnet_jax import compilation_cache
        jax.jit(lambda x: x + 1)(jnp.ones(3))  # compiled before the cache has a path
        compilation_cache.enable({str(cache)!r})
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
        jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3))
    """)
    result = run_process(['-c', script], timeout=120, env={'JAX_PLATFORMS': 'cpu'})
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(name.endswith('-cache') for name in os.listdir(cache))
