"""Compile time (and step time) of the train step, unrolled blocks vs `scan_blocks`.

    python benchmarks/compile_time.py \
        [--models=resnet20,resnet56,resnet110,resnet1202,resnet50,resnet152] \
        [--skip_unrolled=resnet1202] [--steps=3]

For each model, lowers and compiles the trainer's train step (`steps.make_train_step`, the
paper's momentum SGD) at batch 8 (compile time hardly depends on the batch) and prints the
seconds for the unrolled and the scanned net (split into tracing+lowering and XLA's compile,
with the program's size in StableHLO lines) and their ratio. Then it runs the compiled step
`--steps` times on random data and reports the median step time, so a layout that compiles
fast but runs slow shows up (0 skips this). The last line is one JSON object. resnet1202
unrolled takes many minutes on a small CPU, so it is skipped unless asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

import resnet_jax as rj
from resnet_jax import optim, steps
from resnet_jax.train_state import create_train_state


def compile_seconds(name: str, scan_blocks: bool, steps_to_time: int = 0) -> dict[str, float]:
    """Seconds to trace+lower and to XLA-compile the train step, its StableHLO size, and
    (with `steps_to_time`) the median seconds per step at batch 8."""
    imagenet = name in rj.IMAGENET_MODELS
    shape = (64, 64, 3) if imagenet else (32, 32, 3)
    num_classes = 1000 if imagenet else 10
    model = rj.create_model(name, num_classes=num_classes, scan_blocks=scan_blocks)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))['params']
    tx, schedule = optim.create_optimizer(
        optim.OptimizerConfig(), params, total_steps=1000, steps_per_epoch=100
    )
    state = jax.eval_shape(lambda: create_train_state(model, tx, 0, shape))
    batch = {
        'image': jax.ShapeDtypeStruct((8, *shape), np.float32),
        'label': jax.ShapeDtypeStruct((8,), np.int32),
    }
    step = jax.jit(steps.make_train_step(model, tx, schedule), donate_argnums=0)
    start = time.perf_counter()
    lowered = step.lower(state, batch)  # tracing + lowering to StableHLO
    lowered_at = time.perf_counter()
    compiled = lowered.compile()  # XLA
    done = time.perf_counter()
    result = {
        'total_s': done - start,
        'lower_s': lowered_at - start,
        'xla_s': done - lowered_at,
        'hlo_lines': lowered.as_text().count('\n'),
    }
    if steps_to_time:
        result['step_s'] = median_step_seconds(compiled, model, tx, shape, steps_to_time)
    return result


def median_step_seconds(compiled, model, tx, shape, steps_to_time: int) -> float:
    """Median wall seconds of `steps_to_time` calls after one warm-up call."""
    state = jax.jit(lambda: create_train_state(model, tx, 0, shape))()
    rng = np.random.default_rng(0)
    batch = {
        'image': jax.numpy.asarray(rng.standard_normal((8, *shape), np.float32)),
        'label': jax.numpy.asarray(rng.integers(0, 10, 8, dtype=np.int32)),
    }
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(steps_to_time):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--models', default='resnet20,resnet56,resnet110,resnet1202,resnet50,resnet152'
    )
    parser.add_argument('--skip_unrolled', default='resnet1202')
    parser.add_argument('--steps', type=int, default=3, help='steps to time per layout; 0: none')
    args = parser.parse_args()
    if args.steps < 0:
        parser.error(f'--steps={args.steps}: expected a count >= 0')
    skip = set(filter(None, args.skip_unrolled.split(',')))
    results = {'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores', 'models': {}}
    for name in args.models.split(','):
        if name not in rj.MODEL_NAMES:
            parser.error(f'unknown model {name!r}; expected names from {rj.MODEL_NAMES}')
        scanned = compile_seconds(name, True, args.steps)
        unrolled = None if name in skip else compile_seconds(name, False, args.steps)
        results['models'][name] = {
            'unrolled_s': unrolled and unrolled['total_s'],
            'scanned_s': scanned['total_s'],
            'unrolled': unrolled,
            'scanned': scanned,
        }
        for label, t in (('unrolled', unrolled), ('scanned', scanned)):
            if t:
                step = f', step {t["step_s"] * 1e3:.0f} ms' if 'step_s' in t else ''
                print(
                    f'{name:11s} {label:8s} {t["total_s"]:6.1f} s (trace+lower {t["lower_s"]:.1f} '
                    f's, XLA {t["xla_s"]:.1f} s, {t["hlo_lines"]} StableHLO lines){step}',
                    flush=True,
                )
        if unrolled:
            print(f'{name:11s} unrolled / scanned {unrolled["total_s"] / scanned["total_s"]:.1f}x')
    print(json.dumps(results))


if __name__ == '__main__':
    main()
