"""Compile time of the train step, unrolled blocks vs `scan_blocks`.

    python benchmarks/compile_time.py \
        [--models=resnet20,resnet56,resnet110,resnet1202,resnet50,resnet152] \
        [--skip_unrolled=resnet1202]

For each model, lowers and compiles the trainer's train step (`steps.make_train_step`, the
paper's momentum SGD) at batch 8 (compile time hardly depends on the batch) and prints the
seconds for the unrolled and the scanned net and their ratio. The last line is one JSON object.
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


def compile_seconds(name: str, scan_blocks: bool) -> float:
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
    step.lower(state, batch).compile()  # tracing + lowering + XLA compilation
    return time.perf_counter() - start


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
        results['models'][name] = {'unrolled_s': unrolled, 'scanned_s': scanned}
        ratio = f'{unrolled / scanned:5.1f}x' if unrolled else '  (unrolled skipped)'
        shown = f'{unrolled:7.1f} s' if unrolled else '      -  '
        print(f'{name:11s} unrolled {shown}  scanned {scanned:6.1f} s  {ratio}', flush=True)
    print(json.dumps(results))


if __name__ == '__main__':
    main()
