"""Steps per second with one train step per jitted call and with K steps per call.

    python benchmarks/steps_per_call.py [--model=resnet20] [--batch_size=128] [--ks=1,8]
        [--calls_steps=64] [--dtype=float32]

The trainer's step (`steps.make_train_step`) and its K-step form (`steps.make_multi_step`, what
`config.steps_per_call=K` runs) on batches already on the device, so what differs is only the
dispatch and the host's per-call work: the gain of K > 1 is large where a step is short (CIFAR
nets on an accelerator) and small where compute dominates (this CPU). Each setting runs
`--calls_steps` steps after one untimed call; p50/p90 are per step. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

import resnet_jax as rj
from resnet_jax import optim, steps
from resnet_jax.train_state import create_train_state


def steps_per_second(model_name: str, batch: int, k: int, total: int, dtype: str) -> dict:
    imagenet = model_name in rj.IMAGENET_MODELS
    shape = (224, 224, 3) if imagenet else (32, 32, 3)
    model = rj.create_model(model_name, num_classes=1000 if imagenet else 10, dtype=dtype)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))['params']
    tx, schedule = optim.create_optimizer(
        optim.OptimizerConfig(), params, total_steps=10_000, steps_per_epoch=100
    )
    state = create_train_state(model, tx, 0, shape)
    train_step = steps.make_train_step(model, tx, schedule)
    images = jax.random.normal(jax.random.key(1), (k, batch, *shape))
    labels = jax.random.randint(jax.random.key(2), (k, batch), 0, 10)
    if k == 1:
        call = jax.jit(train_step, donate_argnums=0)
        inputs = {'image': images[0], 'label': labels[0]}
    else:
        call = jax.jit(steps.make_multi_step(train_step), donate_argnums=0)
        inputs = {'image': images, 'label': labels}
    start = time.perf_counter()
    state, metrics = call(state, inputs)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    per_step = []
    for _ in range(max(1, total // k)):
        start = time.perf_counter()
        state, metrics = call(state, inputs)
        jax.device_get(metrics['loss'])  # what the loop fetches at its boundaries
        per_step.append((time.perf_counter() - start) / k)
    per_step = np.asarray(per_step)
    return {
        'k': k,
        'compile_s': compile_s,
        'steps_per_s': float(1 / per_step.mean()),
        'p50_ms': float(np.percentile(per_step, 50) * 1e3),
        'p90_ms': float(np.percentile(per_step, 90) * 1e3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='resnet20')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--ks', default='1,8')
    parser.add_argument('--calls_steps', type=int, default=64)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    args = parser.parse_args()
    try:
        ks = [int(k) for k in args.ks.split(',')]
    except ValueError:
        parser.error(f'--ks={args.ks!r}: expected comma-separated positive ints')
    if not ks or min(ks) < 1 or args.batch_size < 1 or args.calls_steps < 1:
        parser.error(f'--ks={args.ks!r}, --batch_size, --calls_steps: expected positive ints')
    print(
        f'{args.model}, batch {args.batch_size}, {args.dtype}, {jax.default_backend()} '
        f'({jax.devices()[0].device_kind}, {platform.machine()})'
    )
    print('| steps per call | steps/s | p50 per step | p90 per step | compile |')
    print('|---|---|---|---|---|')
    results = []
    for k in ks:
        r = steps_per_second(args.model, args.batch_size, k, args.calls_steps, args.dtype)
        results.append(r)
        print(
            f'| {k} | {r["steps_per_s"]:.2f} | {r["p50_ms"]:.1f} ms | {r["p90_ms"]:.1f} ms | '
            f'{r["compile_s"]:.1f} s |'
        )
    print(json.dumps({'model': args.model, 'batch_size': args.batch_size, 'results': results}))


if __name__ == '__main__':
    main()
