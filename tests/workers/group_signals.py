"""Reads batches made by 2 Grain workers while its process group is sent SIGINT, SIGTERM and
SIGHUP, as a terminal or a scheduler sends them (run by tests/test_workers.py).

    python group_signals.py    # started in a session of its own

Its own handlers record the signals, as the trainer's do. They are sent twice: while the
workers start (spawn is still importing this file in them) and after the first batch. Prints
one JSON line: the signals it got and the examples of each batch.
"""

import json
import os
import pathlib
import signal
import sys
import threading

os.environ['JAX_PLATFORMS'] = 'cpu'
# synthetic_data, and this checkout's resnet_jax (not the one the environment has installed)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from synthetic_data import example_indices, synthetic_info, synthetic_source

from resnet_jax import pipelines, preprocessing

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _signal_the_group():
    for signum in SIGNALS:
        os.killpg(0, signum)


def main():
    got = []
    for signum in SIGNALS:
        signal.signal(signum, lambda signum, frame: got.append(signum))
    preprocess = preprocessing.make_preprocess(
        synthetic_info(), train=False, augmentation='none', normalization='none'
    )
    batches = iter(
        pipelines.train_dataset(
            synthetic_source(64),
            preprocess,
            batch_size=8,
            seed=0,
            reading=pipelines.Reading(num_workers=2),
        )
    )
    threading.Timer(0.5, _signal_the_group).start()  # the workers take seconds to start
    examples = [example_indices(next(batches)['image']).tolist()]
    _signal_the_group()
    examples += [example_indices(next(batches)['image']).tolist() for _ in range(5)]
    batches.close()
    print(json.dumps({'signals': sorted(got), 'examples': examples}))


if __name__ == '__main__':
    main()
