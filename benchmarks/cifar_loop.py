"""The trainer on the CIFAR-10 copy, host pipeline against `dataset.in_memory`: which is faster.

    python benchmarks/cifar_loop.py --data_dir ~/.cache/resnet_jax/tfds [--model=resnet20] \
        [--batch_size=128] [--steps=40] [--log_every=10] [--workers=0] [--train_split=train_45k]

Runs `trainer.train_and_evaluate` with `configs/cifar10.py:MODEL` (the paper's recipe) for
`--steps` steps in a fresh workdir, once per input path: the Grain host pipeline (decode,
pad-crop-flip on the host, uint8 batches through device prefetch) and the in-memory path (the
split decoded once, every batch drawn and augmented on the devices). Each figure is the
median of the `train/images_per_sec` the trainer logged, leaving out the first interval
(compilation). Also prints the wall time of each run (start-up and the one-off decode
included). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax

from resnet_jax import config as config_lib
from resnet_jax import sweep, trainer
from resnet_jax.metrics import read_metrics

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'cifar10.py')


def run(args, in_memory: bool) -> dict:
    config = sweep.load_config_module(CONFIG).get_config(args.model)
    config_lib.apply_overrides(
        config,
        {
            'dataset.data_dir': args.data_dir,
            'dataset.in_memory': in_memory,
            'dataset.train_split': args.train_split,
            'dataset.num_workers': args.workers,
            'dataset.eval_split': 'test[:16]',  # the final eval is not what is measured
            'dataset.test_split': '',
            'eval_batch_size': 16,
            'batch_size': args.batch_size,
            'total_steps': args.steps,
            'log_every_steps': args.log_every,
            'eval_every_steps': args.steps,
            'checkpoint_every_steps': args.steps,
            'compilation_cache_dir': '',  # both runs compile, as a first start does
        },
    )
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        trainer.train_and_evaluate(config, workdir)
        wall = time.perf_counter() - start
        rates = [
            r['train/images_per_sec']
            for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
            if 'train/images_per_sec' in r
        ][1:]
    return {
        'in_memory': in_memory,
        'images_per_s': statistics.median(rates),
        'intervals': len(rates),
        'wall_s': wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data_dir', required=True)
    parser.add_argument('--model', default='resnet20')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=40)
    parser.add_argument('--log_every', type=int, default=10)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--train_split', default='train_45k', help="the config's own by default")
    args = parser.parse_args()
    if args.log_every < 1 or args.steps < 2 * args.log_every or args.steps % args.log_every:
        parser.error('--steps must be a multiple of --log_every, at least two intervals')
    print(
        f'{args.model}, batch {args.batch_size}, {args.steps} steps, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind} ({platform.machine()}, '
        f'{os.cpu_count()} cores)'
    )
    print('| input path | images/s (median of intervals) | wall time of the run |')
    print('|---|---|---|')
    results = []
    for in_memory in (False, True):
        r = run(args, in_memory)
        results.append(r)
        name = 'in memory (on the devices)' if in_memory else f'host, {args.workers} workers'
        print(f'| {name} | {r["images_per_s"]:.1f} | {r["wall_s"]:.1f} s |')
    host, device = (r['images_per_s'] for r in results)
    print(f'in memory / host: {device / host:.2f}x')
    print(json.dumps({'args': vars(args), 'results': results, 'ratio': device / host}))


if __name__ == '__main__':
    main()
