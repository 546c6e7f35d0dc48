"""What `make train` runs: resnet20 on the real CIFAR-10 for a few minutes on a CPU.

    python train.py --config=configs/demo.py --workdir=workdirs/demo

The paper's recipe at batch 64 for 700 steps (0.9 epochs of the full 50k train split) with a
cosine schedule so a short run ends at a low learning rate; evaluated on the 10k test split.
Hardware: the 2-core CPU; wall time 4-12 minutes (3 min 49 s and 8 min 20 s measured on two
machines of that kind with the host pipeline; 11 min 22 s in memory on one running at half
speed). Expected: test top-1 accuracy well above the 10% of chance (57.2-58.3% measured; the
README quotes the run and its machine).
"""

import ml_collections

from resnet_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = config_lib.base_config()
    c.model.name = 'resnet20'
    c.dataset.train_split = 'train'
    c.dataset.eval_split = 'test'
    c.dataset.test_split = ''
    c.dataset.in_memory = True  # as configs/cifar10.py: faster here too (benchmarks/cifar_loop.py)
    c.batch_size = 64
    c.eval_batch_size = 512
    c.total_steps = 700
    c.log_every_steps = 50
    c.eval_every_steps = 700
    c.checkpoint_every_steps = 350
    c.optimizer.learning_rate = 0.1 * c.batch_size / 128
    c.optimizer.schedule = 'cosine'
    c.optimizer.warmup_steps = 50
    c.optimizer.warmup_mode = 'linear'
    c.optimizer.warmup_learning_rate = 0.0
    c.lock()
    return c
