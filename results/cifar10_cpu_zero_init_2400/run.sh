#!/usr/bin/env bash
# ResNet-20 vs ResNet-56, zero-initialised residual branches, twice the budget: 2,400 iterations.
#
#   bash results/cifar10_cpu_zero_init_2400/run.sh [SWEEP_DIR]   (from the repository root, in .venv)
#
# results/cifar10_cpu_zero_init/run.sh with 2,400 iterations instead of 1,200 (lr 0.05 at batch
# 64, divided by 10 at 1,200 and 1,800: the same 50% / 75% points), to see whether the deeper
# net's lead grows with training. About an hour on the 2-core CPU. Test error on the first
# 2,000 test images every 400 iterations (curves) and all 10,000 (table). Data: the shared
# JPEG copy of CIFAR-10, all 50,000 training images.
set -euo pipefail
SWEEP_DIR=${1:-${HOME}/.cache/resnet_jax/sweeps/cifar10_cpu_zero_init_2400}
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
  --config.total_steps=2400 \
  --config.optimizer.boundaries='(1200, 1800)' \
  --config.log_every_steps=50 \
  --config.eval_every_steps=400 \
  --config.checkpoint_every_steps=800 \
  --config.eval_batch_size=500

python -m resnet_jax report --workdir="$SWEEP_DIR" --out="$OUT"
python -m resnet_jax tables  # the READMEs quote table.md
