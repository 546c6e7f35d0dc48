"""Compile time of the train step, unrolled blocks vs `scan_blocks`.

    python benchmarks/compile_time.py \
        [--models=resnet20,resnet56,resnet110,resnet1202,resnet50,resnet152] \
        [--skip_unrolled=resnet1202]

For each model, lowers and compiles the trainer's train step (`steps.make_train_step`, the
paper's momentum SGD) at batch 8 (compile time hardly depends on the batch) and prints the
seconds for the unrolled and the scanned net (split into tracing+lowering and XLA's compile,
with the program's size in StableHLO lines) and their ratio. The last line is one JSON object.
resnet1202 unrolled takes many minutes on a small CPU, so it is skipped unless asked for.
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


def compile_seconds(name: str, scan_blocks: bool) -> dict[str, float]:
    """Seconds to trace+lower and to XLA-compile the train step, and its StableHLO size."""
    imagenet = name in rj.IMAGENET_MODELS
    shape = (64, 64, 3) if imagenet else (32, 32, 3)
    num_classes = 1000 if imagenet else 10
    model = rj.create_model(name, num_classes=num_classes, scan_blocks=scan_blocks)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))['params']
    tx, schedule = optim.create_optimizer(
        optim.PAPER_CIFAR_SGD, params, total_steps=1000, steps_per_epoch=100
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
    lowered.compile()  # XLA
    done = time.perf_counter()
    return {
        'total_s': done - start,
        'lower_s': lowered_at - start,
        'xla_s': done - lowered_at,
        'hlo_lines': lowered.as_text().count('\n'),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--models', default='resnet20,resnet56,resnet110,resnet1202,resnet50,resnet152'
    )
    parser.add_argument('--skip_unrolled', default='resnet1202')
    args = parser.parse_args()
    skip = set(filter(None, args.skip_unrolled.split(',')))
    results = {'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores', 'models': {}}
    for name in args.models.split(','):
        if name not in rj.MODEL_NAMES:
            parser.error(f'unknown model {name!r}; expected names from {rj.MODEL_NAMES}')
        scanned = compile_seconds(name, scan_blocks=True)
        unrolled = None if name in skip else compile_seconds(name, scan_blocks=False)
        results['models'][name] = {
            'unrolled_s': unrolled and unrolled['total_s'],
            'scanned_s': scanned['total_s'],
            'unrolled': unrolled,
            'scanned': scanned,
        }
        for label, t in (('unrolled', unrolled), ('scanned', scanned)):
            if t:
                print(
                    f'{name:11s} {label:8s} {t["total_s"]:6.1f} s (trace+lower {t["lower_s"]:.1f} '
                    f's, XLA {t["xla_s"]:.1f} s, {t["hlo_lines"]} StableHLO lines)',
                    flush=True,
                )
        if unrolled:
            print(f'{name:11s} unrolled / scanned {unrolled["total_s"] / scanned["total_s"]:.1f}x')
    print(json.dumps(results))


if __name__ == '__main__':
    main()
