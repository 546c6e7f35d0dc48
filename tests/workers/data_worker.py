"""One process of a 2-process data test (run by tests/test_data_multiprocess.py).

    python data_worker.py PORT PROCESS_ID NUM_PROCESSES

Joins a JAX cluster on 127.0.0.1 with gloo CPU collectives and 2 CPU devices per process,
reads its shard of a synthetic dataset whose images encode their index, assembles global
batches, and prints one JSON line with what every device of every process saw.
"""

import json
import os
import pathlib
import sys

os.environ['JAX_NUM_CPU_DEVICES'] = '2'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # this checkout's package
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/

import jax
import numpy as np
from jax.experimental import multihost_utils
from synthetic_data import example_indices, synthetic_info, synthetic_source

from resnet_jax import pipelines, preprocessing, sharding


def main():
    port, process_id, num_processes = (int(a) for a in sys.argv[1:4])
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=f'127.0.0.1:{port}',
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,
    )
    info = synthetic_info()
    preprocess = preprocessing.make_preprocess(
        info, train=False, augmentation='none', normalization='none'
    )
    mesh = sharding.data_mesh()
    source = synthetic_source(64)
    local = sharding.local_batch_size(16, mesh)
    train = pipelines.train_dataset(source, preprocess, batch_size=local, seed=0)
    iterator = iter(train)
    seen_train, seen_local = [], []
    for _ in range(4):  # one epoch: 4 global batches of 16
        local_batch = next(iterator)
        seen_local.append(example_indices(local_batch['image']).tolist())
        batch = sharding.global_batch(local_batch, mesh)
        gathered = multihost_utils.process_allgather(batch['image'], tiled=True)
        seen_train.append(example_indices(np.asarray(gathered)).tolist())
    real_eval = 0
    seen_eval = []
    for local_batch in pipelines.eval_dataset(synthetic_source(37), preprocess, batch_size=4):
        batch = sharding.global_batch(local_batch, mesh)
        mask = np.asarray(multihost_utils.process_allgather(batch['mask'], tiled=True))
        images = np.asarray(multihost_utils.process_allgather(batch['image'], tiled=True))
        real_eval += int(mask.sum())
        seen_eval += example_indices(images)[mask].tolist()
    print(
        json.dumps(
            {
                'process': jax.process_index(),
                'devices': jax.device_count(),
                'local_devices': jax.local_device_count(),
                'local_batch': local,
                'train': seen_train,
                'local': seen_local,
                'eval_count': real_eval,
                'eval': sorted(seen_eval),
            }
        ),
        flush=True,
    )
    jax.distributed.shutdown()


if __name__ == '__main__':
    main()
