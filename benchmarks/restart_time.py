"""Restart time: seconds from `python train.py` to its first step, first start vs restarts.

    python benchmarks/restart_time.py [--models=resnet20,resnet50] [--data_dir=DIR]

For each model, three real `train.py` processes on one workdir (CIFAR-10 at 32x32, batch 16,
one CPU device as a user's plain run has):
  first start      new workdir, empty compilation cache: compiles everything;
  restart          the same run resumed (restores the checkpoint), cache as the first start
                   left it: what a preempted run pays to get going again;
  restart, no cache  the same with `--config.compilation_cache_dir=''`.
Each time runs from process start to the log line of the first step the process trains.
Prints a markdown table and, last, one JSON line.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time_to_step(workdir, cache, model, step, data_dir):
    argv = [
        sys.executable,
        os.path.join(REPO, 'train.py'),
        '--config=' + os.path.join(REPO, 'configs', 'smoke.py'),
        f'--workdir={workdir}',
        f'--config.model.name={model}',
        f'--config.dataset.data_dir={data_dir}',
        f'--config.total_steps={step}',
        '--config.log_every_steps=1',
        '--config.eval_every_steps=1000',
        '--config.checkpoint_every_steps=1',
        f'--config.compilation_cache_dir={cache}',
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env={**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = None
    output = []
    for line in proc.stdout:
        output.append(line)
        if seen is None and re.search(rf'\bstep {step}/{step}\b', line):
            seen = time.monotonic() - start
    proc.wait()
    if proc.returncode != 0 or seen is None:
        sys.exit(f'error: train.py failed for {model}:\n' + ''.join(output[-30:]))
    return seen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default='resnet20,resnet50')
    parser.add_argument(
        '--data_dir', default=os.path.expanduser('~/.cache/resnet_jax/tfds'), help='TFDS dir'
    )
    args = parser.parse_args()
    rows = {}
    for model in args.models.split(','):
        with tempfile.TemporaryDirectory() as tmp:
            workdir, cache = os.path.join(tmp, 'run'), os.path.join(tmp, 'xla')
            first = _time_to_step(workdir, cache, model, 1, args.data_dir)
            restart = _time_to_step(workdir, cache, model, 2, args.data_dir)
            uncached = _time_to_step(workdir, '', model, 3, args.data_dir)
            entries = len(os.listdir(cache)) if os.path.isdir(cache) else 0
        rows[model] = {
            'first_start_s': round(first, 1),
            'restart_s': round(restart, 1),
            'restart_without_cache_s': round(uncached, 1),
            'cache_entries': entries,
        }
    print('| model | first start | restart (cache) | restart (no cache) | cache entries |')
    print('|---|---|---|---|---|')
    for model, r in rows.items():
        print(
            f'| {model} | {r["first_start_s"]} s | {r["restart_s"]} s | '
            f'{r["restart_without_cache_s"]} s | {r["cache_entries"]} |'
        )
    print(json.dumps({'benchmark': 'restart_time', 'models': rows}))


if __name__ == '__main__':
    main()
