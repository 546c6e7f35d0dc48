"""How much of the time the step waits for its batch, with and without device prefetch.

    python benchmarks/prefetch.py [--steps=200] [--step_ms=20] [--host_ms=15] [--jitter=1.0]

A trivial jitted step that takes about `--step_ms` on the device (a matmul loop sized once at
start), fed by a host iterator whose batches take `--host_ms` on average with random delays
(exponentially distributed: `--jitter` 1 means the standard deviation equals the mean, as a
pipeline with occasional slow images has). The stall fraction is the share of the wall time
the loop spent waiting in `next()` with the device idle (each step is waited for); the same
random delays are replayed for every setting.
Prefetch cannot make a host that is slower on average than the step keep up; it removes the
stalls of jitter when the host is faster on average. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import prefetch, sharding


def _step_of(ms: float):
    """A jitted step of about `ms` milliseconds on this backend, and its input."""
    x = jnp.ones((256, 256), jnp.float32)

    def make(n):
        return jax.jit(lambda x, b: jax.lax.fori_loop(0, n, lambda _, y: jnp.tanh(y @ x), b))

    batch = jnp.ones((256, 256))
    probe = make(50)
    probe(x, batch).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        probe(x, batch).block_until_ready()
    per_iteration = max((time.perf_counter() - start) / 250, 1e-6)
    n = max(1, round(ms / 1000 / per_iteration))
    step = make(n)
    step(x, batch).block_until_ready()
    return lambda b: step(x, b)


def _host(delays: np.ndarray):
    for delay in delays:
        time.sleep(delay)
        yield np.ones((256, 256), np.float32)


def stall_fraction(step, delays: np.ndarray, size: int) -> dict[str, float]:
    to_device = lambda b: jax.device_put(b, sharding.batch_sharding(sharding.data_mesh()))
    batches = prefetch.prefetch_to_device(_host(delays), to_device, size)
    waited = 0.0
    start = time.perf_counter()
    for _ in range(len(delays)):
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        # Waited for, so that time in next() is time the device had nothing to do.
        step(batch).block_until_ready()
    total = time.perf_counter() - start
    batches.close()
    return {'stall_fraction': waited / total, 'seconds': total, 'steps_per_s': len(delays) / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument('--step_ms', type=float, default=20.0)
    parser.add_argument('--host_ms', type=float, default=15.0)
    parser.add_argument('--jitter', type=float, default=1.0)
    parser.add_argument('--sizes', default='0,1,2,4')
    args = parser.parse_args()
    for name in ('steps', 'step_ms', 'host_ms'):
        if getattr(args, name) <= 0:
            parser.error(f'--{name}={getattr(args, name)}: expected > 0')
    if args.jitter < 0:
        parser.error(f'--jitter={args.jitter}: expected >= 0')
    sizes = [int(s) for s in args.sizes.split(',')]
    mean = args.host_ms / 1000
    rng = np.random.default_rng(0)
    jittered = mean * (1 - min(args.jitter, 1.0)) + rng.exponential(
        mean * min(args.jitter, 1.0), args.steps
    )
    step = _step_of(args.step_ms)
    print(
        f'step ~{args.step_ms:g} ms, host {args.host_ms:g} ms on average (jitter {args.jitter:g}), '
        f'{args.steps} steps, {jax.default_backend()} ({platform.machine()})'
    )
    print('| prefetch_batches | stall fraction | steps/s |')
    print('|---|---|---|')
    results = {}
    for size in sizes:
        r = stall_fraction(step, jittered, size)
        results[size] = r
        print(f'| {size} | {r["stall_fraction"]:.1%} | {r["steps_per_s"]:.1f} |')
    print(json.dumps({'args': vars(args), 'results': results}))


if __name__ == '__main__':
    main()
