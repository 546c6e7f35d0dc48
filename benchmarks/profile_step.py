"""A `jax.profiler` trace of a few train steps and XLA's memory analysis of the step.

    python benchmarks/profile_step.py --out=DIR [--model=resnet50] [--batch_size=256]
        [--image_size=224] [--dtype=bfloat16] [--steps=5]

Writes DIR/trace/ (open with TensorBoard's profile plugin or Perfetto) and DIR/memory.json
(temp, argument, output and generated-code bytes of the compiled step); prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

import resnet_jax as rj
from resnet_jax import optim, steps
from resnet_jax.train_state import create_train_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--model', default='resnet50')
    parser.add_argument('--batch_size', type=int, default=256)
    parser.add_argument('--image_size', type=int, default=224)
    parser.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
    parser.add_argument('--steps', type=int, default=5)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f'--steps={args.steps}: expected >= 1')
    os.makedirs(args.out, exist_ok=True)
    imagenet = args.model in rj.IMAGENET_MODELS
    shape = (args.image_size, args.image_size, 3)
    model = rj.create_model(args.model, num_classes=1000 if imagenet else 10, dtype=args.dtype)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))['params']
    tx, schedule = optim.create_optimizer(
        optim.OptimizerConfig(), params, total_steps=10_000, steps_per_epoch=100
    )
    state = create_train_state(model, tx, 0, shape)
    batch = {
        'image': jax.random.normal(jax.random.key(1), (args.batch_size, *shape)),
        'label': jax.random.randint(jax.random.key(2), (args.batch_size,), 0, 10),
    }
    step = jax.jit(steps.make_train_step(model, tx, schedule), donate_argnums=0)
    compiled = step.lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    memory = {
        name: int(getattr(analysis, f'{name}_size_in_bytes'))
        for name in ('temp', 'argument', 'output', 'generated_code')
        if hasattr(analysis, f'{name}_size_in_bytes')
    }
    state, metrics = compiled(state, batch)  # warm up outside the trace
    jax.block_until_ready(metrics)
    with jax.profiler.trace(os.path.join(args.out, 'trace')):
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    record = {'model': args.model, 'batch_size': args.batch_size, 'memory_bytes': memory}
    with open(os.path.join(args.out, 'memory.json'), 'w') as f:
        json.dump(record, f, indent=1)
    traced = sum(len(files) for _, _, files in os.walk(os.path.join(args.out, 'trace')))
    print(
        f'trace: {traced} files in {args.out}/trace; loss {float(np.asarray(metrics["loss"])):.3f}'
    )
    print(json.dumps(record))


if __name__ == '__main__':
    main()
