"""A tiny run for tests and CI: resnet20 on 512 real CIFAR-10 images, a few steps.

    python train.py --config=configs/smoke.py --workdir=/tmp/smoke

Hardware: the 2-core CPU; wall time about 40 s (mostly compilation). Expected: it finishes,
writes metrics.jsonl and a checkpoint; accuracy is not the point.
"""

import ml_collections

from resnet_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = config_lib.base_config()
    c.model.name = 'resnet20'
    c.dataset.train_split = 'train[:512]'
    c.dataset.eval_split = 'test[:72]'  # not a multiple of the eval batch: exact eval is exercised
    c.dataset.test_split = ''
    c.batch_size = 16
    c.eval_batch_size = 16
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    c.optimizer.boundaries = (4,)
    c.lock()
    return c
