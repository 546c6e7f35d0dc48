"""Device memory of the train step: with and without `model.remat`, and with gradient
accumulation (`optimizer.accumulate_steps`) in place of one large batch.

    python benchmarks/memory.py [--model=resnet50] [--batch_size=64] [--image_size=224]
        [--accumulate_steps=4]

Compiles (does not run) the trainer's train step for each setting and prints XLA's own
`compiled.memory_analysis()`: temporary bytes (activations kept for the backward pass and
scratch), argument and output bytes (the state and the batch; the state is donated, so the
output reuses it). Compilation is deterministic, so one run per setting suffices; the figures
are those of the backend it runs on (CPU here; the GPU's differ). The last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import jax
import numpy as np

import resnet_jax as rj
from resnet_jax import optim, steps
from resnet_jax.train_state import create_train_state


def memory_of(
    model_name: str, batch: int, image: int, *, remat: bool, accumulate: int, scan_blocks: bool
) -> dict:
    """XLA's memory analysis of the compiled train step at `batch` examples per call."""
    imagenet = model_name in rj.IMAGENET_MODELS
    model = rj.create_model(
        model_name, num_classes=1000 if imagenet else 10, remat=remat, scan_blocks=scan_blocks
    )
    shape = (image, image, 3)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))['params']
    cfg = dataclasses.replace(optim.OptimizerConfig(), accumulate_steps=accumulate)
    tx, schedule = optim.create_optimizer(cfg, params, total_steps=1000, steps_per_epoch=100)
    state = jax.eval_shape(lambda: create_train_state(model, tx, 0, shape))
    inputs = {
        'image': jax.ShapeDtypeStruct((batch, *shape), np.float32),
        'label': jax.ShapeDtypeStruct((batch,), np.int32),
    }
    step = jax.jit(steps.make_train_step(model, tx, schedule), donate_argnums=0)
    analysis = step.lower(state, inputs).compile().memory_analysis()
    return {
        'temp_bytes': int(analysis.temp_size_in_bytes),
        'argument_bytes': int(analysis.argument_size_in_bytes),
        'output_bytes': int(analysis.output_size_in_bytes),
    }


def _mib(n: int) -> str:
    return f'{n / 2**20:,.0f} MiB'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='resnet50')
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--image_size', type=int, default=224)
    parser.add_argument('--accumulate_steps', type=int, default=4)
    parser.add_argument('--scan_blocks', action='store_true', help='model.scan_blocks=True')
    args = parser.parse_args()
    if args.batch_size % args.accumulate_steps:
        parser.error(
            f'--accumulate_steps={args.accumulate_steps} does not divide '
            f'--batch_size={args.batch_size}'
        )
    micro = args.batch_size // args.accumulate_steps
    settings = [
        ('one step', args.batch_size, False, 1),
        ('one step, remat', args.batch_size, True, 1),
        (f'{args.accumulate_steps} x {micro}, accumulated', micro, False, args.accumulate_steps),
        (
            f'{args.accumulate_steps} x {micro}, accumulated, remat',
            micro,
            True,
            args.accumulate_steps,
        ),
    ]
    print(
        f'{args.model}{" (scan_blocks)" if args.scan_blocks else ""}, batch {args.batch_size} '
        f'({args.image_size}x{args.image_size}), '
        f'{jax.default_backend()} ({platform.processor() or platform.machine()})'
    )
    print('| setting | per call | temp | arguments | outputs |')
    print('|---|---|---|---|---|')
    results = []
    for label, batch, remat, accumulate in settings:
        mem = memory_of(
            args.model,
            batch,
            args.image_size,
            remat=remat,
            accumulate=accumulate,
            scan_blocks=args.scan_blocks,
        )
        results.append({'setting': label, 'batch': batch, 'remat': remat, **mem})
        print(
            f'| {label} | {batch} | {_mib(mem["temp_bytes"])} | '
            f'{_mib(mem["argument_bytes"])} | {_mib(mem["output_bytes"])} |'
        )
    summary = {'model': args.model, 'scan_blocks': args.scan_blocks, 'results': results}
    print(json.dumps({**summary, 'image_size': args.image_size}))


if __name__ == '__main__':
    main()
