"""Restart time: seconds from `python train.py` to its first step, and the seconds it spends
compiling, first start vs restarts.

    python benchmarks/restart_time.py [--models=resnet20,resnet50] [--data_dir=DIR]
    python benchmarks/restart_time.py --models=resnet20 --processes=2

For each model, three real `train.py` runs on one workdir (CIFAR-10 at 32x32, batch 16, one
CPU device per process):
  first start      new workdir, empty compilation cache: compiles everything;
  restart          the same run resumed (restores the checkpoint), cache as the first start
                   left it: what a preempted run pays to get going again;
  restart, no cache  the same with `--config.compilation_cache_dir=''`.
One process uses a cache in a temporary folder; `--processes=N` starts N processes through
scripts/launch_local.py with the config's default cache, which for several processes is
WORKDIR/xla_cache (resnet_jax.compilation_cache).
Times: to the log line of the first step the run trains (process 0 logs); compile seconds: the
sum of JAX's "Finished XLA compilation" times (JAX_LOG_COMPILES=1; a cache hit counts its
load), and the persistent-cache hits, for each process. Prints a markdown table and, last, one
JSON line.
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
_COMPILED = re.compile(r'Finished XLA compilation of .* in ([0-9.]+) sec')
_HIT = re.compile(r'Persistent compilation cache hit for')
_PROCESS = re.compile(r'^\[p(\d+)\] ')


def _command(workdir, cache, model, step, data_dir, processes):
    train = [
        os.path.join(REPO, 'train.py'),
        '--config=' + os.path.join(REPO, 'configs', 'smoke.py'),
        f'--workdir={workdir}',
        f'--config.model.name={model}',
        f'--config.dataset.data_dir={data_dir}',
        f'--config.total_steps={step}',
        '--config.log_every_steps=1',
        '--config.eval_every_steps=1000',
        '--config.checkpoint_every_steps=1',
    ]
    if cache is not None:
        train.append(f'--config.compilation_cache_dir={cache}')
    if processes == 1:
        return [sys.executable, *train]
    launcher = os.path.join(REPO, 'scripts', 'launch_local.py')
    return [
        sys.executable,
        launcher,
        f'--num_processes={processes}',
        '--devices_per_process=1',
        '--timeout_seconds=1800',
        '--',
        *train,
    ]


def _run(workdir, cache, model, step, data_dir, processes):
    """(seconds to the step's log line, compile seconds per process, cache hits per process)."""
    env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu', 'JAX_LOG_COMPILES': '1'}
    start = time.monotonic()
    proc = subprocess.Popen(
        _command(workdir, cache, model, step, data_dir, processes),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = None
    output = []
    compiled, hits = [0.0] * processes, [0] * processes
    for line in proc.stdout:
        output.append(line)
        match = _PROCESS.match(line)
        process = int(match[1]) if match else 0
        if seen is None and re.search(rf'\bstep {step}/{step}\b', line):
            seen = time.monotonic() - start
        if found := _COMPILED.search(line):
            compiled[process] += float(found[1])
        hits[process] += bool(_HIT.search(line))
    proc.wait()
    if proc.returncode != 0 or seen is None:
        sys.exit(f'error: train.py failed for {model}:\n' + ''.join(output[-30:]))
    return seen, [round(c, 1) for c in compiled], hits


def _measure(model, data_dir, processes):
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, 'run')
        # One process: a cache of its own here; several: their default, WORKDIR/xla_cache.
        cache = os.path.join(tmp, 'xla') if processes == 1 else None
        runs = {
            'first start': _run(workdir, cache, model, 1, data_dir, processes),
            'restart': _run(workdir, cache, model, 2, data_dir, processes),
            'restart, no cache': _run(workdir, '', model, 3, data_dir, processes),
        }
        folder = cache or os.path.join(workdir, 'xla_cache')
        entries = len(os.listdir(folder)) if os.path.isdir(folder) else 0
    return {
        name: {'to_first_step_s': round(s, 1), 'compile_s': c, 'cache_hits': h}
        for name, (s, c, h) in runs.items()
    } | {'cache_entries': entries}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default='resnet20,resnet50')
    parser.add_argument('--processes', type=int, default=1, help='>1: through launch_local.py')
    parser.add_argument(
        '--data_dir', default=os.path.expanduser('~/.cache/resnet_jax/tfds'), help='TFDS dir'
    )
    args = parser.parse_args()
    models = args.models.split(',')
    rows = {model: _measure(model, args.data_dir, args.processes) for model in models}
    print('| model | processes | run | to first step | compile (per process) | cache hits |')
    print('|---|---|---|---|---|---|')
    for model, runs in rows.items():
        for name, r in runs.items():
            if name == 'cache_entries':
                continue
            compile_s = ' / '.join(f'{c} s' for c in r['compile_s'])
            hits = ' / '.join(map(str, r['cache_hits']))
            print(
                f'| {model} | {args.processes} | {name} | {r["to_first_step_s"]} s | '
                f'{compile_s} | {hits} |'
            )
    result = {'benchmark': 'restart_time', 'processes': args.processes, 'models': rows}
    print(json.dumps(result))


if __name__ == '__main__':
    main()
