#!/usr/bin/env bash
# ResNet-20 vs ResNet-56 with zero-initialised residual branches, CPU, about 30 minutes.
#
#   bash results/cifar10_cpu_zero_init/run.sh [SWEEP_DIR]     (from the repository root, in .venv)
#
# The companion of results/cifar10_cpu/run.sh, with the same budget (1,200 iterations at batch
# 64, lr 0.05 divided by 10 at 600 and 900, all 50,000 training images) and one change from the
# paper: model.zero_init_residual=True starts the last BN scale of every residual branch at zero
# (Goyal et al., 2017), so at iteration 0 each net is its shortcut path and depth adds no
# start-up transient. With the paper's initialisation, ResNet-56 still trails ResNet-20 after
# 1,200 iterations (results/cifar10_cpu); this run shows whether that is a start-up effect.
# Plain nets have no residual branch to zero, so they are not part of this run. Test error on
# the first 2,000 test images (curves) and all 10,000 (table). Data: the shared JPEG copy.
set -euo pipefail
SWEEP_DIR=${1:-${HOME}/.cache/resnet_jax/sweeps/cifar10_cpu_zero_init}
OUT=$(dirname "$0")

# dataset.in_memory=False: the host pipeline's data stream, which the committed figures were
# made with (configs/cifar10.py draws its batches in memory since).
python -m resnet_jax sweep --config=configs/cifar10.py \
  --models=resnet20,resnet56 --workdir="$SWEEP_DIR" \
  --config.model.zero_init_residual=True \
  --config.dataset.train_split=train \
  --config.dataset.in_memory=False \
  --config.dataset.eval_split='test[:2000]' \
  --config.dataset.test_split=test \
  --config.batch_size=64 \
  --config.optimizer.learning_rate=0.05 \
  --config.total_steps=1200 \
  --config.optimizer.boundaries='(600, 900)' \
  --config.log_every_steps=50 \
  --config.eval_every_steps=200 \
  --config.checkpoint_every_steps=400 \
  --config.eval_batch_size=500

python -m resnet_jax report --workdir="$SWEEP_DIR" --out="$OUT"
python -m resnet_jax tables  # the READMEs quote table.md
