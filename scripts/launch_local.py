"""Run N JAX processes on this machine, as the hosts of a TPU pod slice would run.

    python scripts/launch_local.py --num_processes=2 --devices_per_process=2 -- \
        train.py --config=configs/smoke.py --workdir=/tmp/run

Each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I`
appended to its command line (train.py's flags), CPU devices of its own
(JAX_NUM_CPU_DEVICES) and gloo collectives over loopback: the multi-process code path of a pod
(jax.distributed, process-local data, global arrays, collective checkpoints) on one CPU.

Output lines are prefixed with `[pI]`. Bounded: if any process fails, the others get
`--grace_seconds` to stop on their own (their heartbeat timeout should make them), then
SIGTERM, then SIGKILL; the whole launch is killed after `--timeout_seconds`. Exit status: 0 if
every process exited 0, else that of the first to fail (128 + signal for a signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def process_env(devices_per_process: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one CPU process of a local cluster."""
    env = dict(os.environ if base is None else base)
    env['JAX_PLATFORMS'] = 'cpu'
    env['JAX_NUM_CPU_DEVICES'] = str(devices_per_process)
    env['JAX_CPU_COLLECTIVES_IMPLEMENTATION'] = 'gloo'
    # An inherited device-count flag (from a test runner) would override JAX_NUM_CPU_DEVICES.
    flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
    env['XLA_FLAGS'] = ' '.join(flags)
    env['PYTHONUNBUFFERED'] = '1'
    return env


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ''):
        out.write(f'{prefix}{line}')
        out.flush()


def _describe(code: int) -> str:
    if code < 0:
        return f'killed by {signal.Signals(-code).name}'
    return f'exit code {code}'


def launch(
    command: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int,
    timeout_seconds: float,
    grace_seconds: float,
    out=sys.stdout,
) -> int:
    """Starts the processes, streams their output, returns the launch's exit status."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(
            f'num_processes={num_processes} and devices_per_process={devices_per_process}; '
            'expected both >= 1'
        )
    if not command:
        raise ValueError('no command; expected e.g. -- train.py --config=... --workdir=...')
    port = free_port()
    env = process_env(devices_per_process)
    procs = []
    for i in range(num_processes):
        argv = [
            sys.executable,
            *command,
            f'--coordinator_address=127.0.0.1:{port}',
            f'--num_processes={num_processes}',
            f'--process_id={i}',
        ]
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=_pump, args=(proc.stdout, f'[p{i}] ', out), daemon=True).start()
        out.write(f'[launch] process {i} pid {proc.pid}\n')
        procs.append(proc)
    out.flush()

    deadline = time.monotonic() + timeout_seconds
    first_failure: tuple[int, int] | None = None  # (process, code)
    failure_time = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        for i, p in enumerate(procs):
            if first_failure is None and p.poll() not in (None, 0):
                first_failure, failure_time = (i, p.returncode), now
                out.write(
                    f'[launch] process {i} failed ({_describe(p.returncode)}); the others have '
                    f'{grace_seconds:.0f} s to stop\n'
                )
        if now > deadline or (failure_time is not None and now > failure_time + grace_seconds):
            reason = 'timed out' if now > deadline else 'did not stop after a peer failed'
            for i, p in enumerate(procs):
                if p.poll() is None:
                    out.write(f'[launch] process {i} {reason}: terminating it\n')
                    p.terminate()
            try:
                for p in procs:
                    p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
            if first_failure is None:
                first_failure = (-1, 124)
            break
        time.sleep(0.1)
    for p in procs:
        p.wait()
    codes = [p.returncode for p in procs]
    out.write(f'[launch] exit codes: {codes}\n')
    out.flush()
    if first_failure is None and all(c == 0 for c in codes):
        return 0
    if first_failure is None:
        first_failure = next((i, c) for i, c in enumerate(codes) if c != 0)
    code = first_failure[1]
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--num_processes', type=int, default=2)
    parser.add_argument('--devices_per_process', type=int, default=2)
    parser.add_argument('--timeout_seconds', type=float, default=1800)
    parser.add_argument('--grace_seconds', type=float, default=90)
    parser.add_argument('command', nargs=argparse.REMAINDER, help='-- SCRIPT [ARGS...]')
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    try:
        return launch(
            command,
            num_processes=args.num_processes,
            devices_per_process=args.devices_per_process,
            timeout_seconds=args.timeout_seconds,
            grace_seconds=args.grace_seconds,
        )
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
