"""Two real JAX processes over loopback read disjoint shards and assemble global batches."""

import json
import pathlib
import subprocess
import sys

import portpicker
import pytest
from synthetic_data import example_indices, synthetic_info, synthetic_source

from resnet_jax import pipelines, preprocessing

_INFO = synthetic_info()
_PREPROCESS = preprocessing.make_preprocess(
    _INFO, train=False, augmentation='none', normalization='none'
)

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
    # Both processes see the same global batches, those of one process reading it all; each
    # process read only its half of each.
    assert a['train'] == b['train']
    alone = pipelines.train_dataset(
        synthetic_source(64),
        _PREPROCESS,
        batch_size=16,
        seed=0,
        reading=pipelines.Reading(process_index=0, process_count=1),
    )
    iterator = iter(alone)
    assert a['train'] == [example_indices(next(iterator)['image']).tolist() for _ in range(4)]
    epoch = [i for batch in a['train'] for i in batch]
    assert sorted(epoch) == list(range(64))
    for batch, first, second in zip(a['train'], a['local'], b['local'], strict=True):
        assert (batch[:8], batch[8:]) == (first, second)
    # Eval: 37 examples over 2 processes, each counted exactly once.
    assert a['eval_count'] == b['eval_count'] == 37
    assert a['eval'] == list(range(37))
