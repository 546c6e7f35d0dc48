"""Two real JAX processes over loopback read disjoint shards and assemble global batches."""

import json
import pathlib
import subprocess
import sys

import portpicker
import pytest

WORKER = pathlib.Path(__file__).parent / 'workers' / 'data_worker.py'


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_share_the_global_batch_and_the_eval_split():
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), '2'],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()
    a, b = sorted(outputs, key=lambda o: o['process'])
    assert (a['devices'], a['local_devices'], a['local_batch']) == (4, 2, 8)
    # Both processes see the same global batches; each half comes from one process's shard.
    assert a['train'] == b['train']
    epoch = [i for batch in a['train'] for i in batch]
    assert sorted(epoch) == list(range(64))
    for batch in a['train']:
        first, second = set(batch[:8]), set(batch[8:])
        assert all(i % 2 == 0 for i in first) and all(i % 2 == 1 for i in second)
    # Eval: 37 examples over 2 processes, each counted exactly once.
    assert a['eval_count'] == b['eval_count'] == 37
    assert a['eval'] == list(range(37))
