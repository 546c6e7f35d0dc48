"""The trainer's loop end to end on synthetic uint8 host batches: host-to-device copies and
device prefetch included, the input pipeline itself left out (the GPU image has no Grain).

    python benchmarks/loop_throughput.py [--model=resnet50] [--batch_size=256]
        [--image_size=224] [--dtype=bfloat16] [--steps=50] [--prefetch=0,2]

Host batches are uint8 NHWC numpy arrays (made once, cycled), moved by
`resnet_jax.prefetch.prefetch_to_device` exactly as the trainer moves its batches, and
normalised inside the jitted step. Per setting: images/s over `--steps` steps after one untimed
step, p50/p90 of the time between consecutive steps' losses. The last line is JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time

import jax
import numpy as np

import resnet_jax as rj
from resnet_jax import augment, optim, prefetch, sharding, steps
from resnet_jax.train_state import create_train_state

MEAN = np.asarray([123.675, 116.28, 103.53], np.float32)
STD = np.asarray([58.395, 57.12, 57.375], np.float32)


def run(args, prefetch_batches: int) -> dict:
    imagenet = args.model in rj.IMAGENET_MODELS
    classes = 1000 if imagenet else 10
    shape = (args.image_size, args.image_size, 3)
    model = rj.create_model(args.model, num_classes=classes, dtype=args.dtype)
    mesh = sharding.data_mesh()
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))['params']
    tx, schedule = optim.create_optimizer(
        optim.OptimizerConfig(), params, total_steps=10_000, steps_per_epoch=100
    )
    state = create_train_state(model, tx, 0, shape)
    # uint8 in, normalised on the device: the trainer's step with its `normalize`.
    normalize = lambda images: augment.normalize(images, MEAN, STD)
    step = jax.jit(
        steps.make_train_step(model, tx, schedule, normalize=normalize), donate_argnums=0
    )
    rng = np.random.default_rng(0)
    local = sharding.local_batch_size(args.batch_size, mesh)
    pool = [
        {
            'image': rng.integers(0, 256, (local, *shape), np.uint8),
            'label': rng.integers(0, classes, (local,), np.int32),
        }
        for _ in range(4)
    ]
    batches = prefetch.prefetch_to_device(
        itertools.cycle(pool), lambda b: sharding.global_batch(b, mesh), prefetch_batches
    )
    state, metrics = step(state, next(batches))
    jax.device_get(metrics['loss'])
    times = []
    start = last = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, next(batches))
        jax.device_get(metrics['loss'])  # as the loop's log and checks do, at every step here
        now = time.perf_counter()
        times.append(now - last)
        last = now
    total = time.perf_counter() - start
    batches.close()
    times = np.asarray(times)
    return {
        'prefetch_batches': prefetch_batches,
        'images_per_s': args.steps * args.batch_size / total,
        'p50_ms': float(np.percentile(times, 50) * 1e3),
        'p90_ms': float(np.percentile(times, 90) * 1e3),
        'host_bytes_per_step': int(args.batch_size * np.prod(shape)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='resnet50')
    parser.add_argument('--batch_size', type=int, default=256)
    parser.add_argument('--image_size', type=int, default=224)
    parser.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
    parser.add_argument('--steps', type=int, default=50)
    parser.add_argument('--prefetch', default='0,2')
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.image_size < 8:
        parser.error('--steps, --batch_size must be positive and --image_size at least 8')
    sizes = [int(p) for p in args.prefetch.split(',')]
    print(
        f'{args.model}, batch {args.batch_size} uint8 {args.image_size}x{args.image_size}, '
        f'{args.dtype}, {jax.device_count()} x {jax.devices()[0].device_kind} '
        f'({platform.machine()})'
    )
    print('| prefetch_batches | images/s | p50 step | p90 step | host bytes/step |')
    print('|---|---|---|---|---|')
    results = []
    for size in sizes:
        r = run(args, size)
        results.append(r)
        print(
            f'| {size} | {r["images_per_s"]:.1f} | {r["p50_ms"]:.1f} ms | {r["p90_ms"]:.1f} ms | '
            f'{r["host_bytes_per_step"] / 2**20:.1f} MiB |'
        )
    print(json.dumps({'args': vars(args), 'results': results}))


if __name__ == '__main__':
    main()
