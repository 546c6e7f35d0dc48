#!/usr/bin/env bash
# ResNet-20 vs ResNet-56 training error on a 5,000-image subset of CIFAR-10, CPU, ~25 minutes.
#
#   bash results/cifar10_cpu_subset/run.sh [SWEEP_DIR]     (from the repository root, in .venv)
#
# The companion of results/cifar10_cpu/run.sh: there, 1,200 iterations are 1.5 epochs of the
# full training set, too few for the deeper residual net to pull ahead. Here the same 1,000
# iterations at batch 64 are 12.8 epochs of the first 5,000 training images, so the comparison
# is of how well each net fits (optimises) its training set, which is what degradation is about.
# Recipe otherwise as configs/cifar10.py (lr 0.05 for batch 64, /10 at 50% and 75%). Test error
# on the first 2,000 test images (curves) and all 10,000 (table). Data: the shared JPEG copy.
set -euo pipefail
SWEEP_DIR=${1:-${HOME}/.cache/resnet_jax/sweeps/cifar10_cpu_subset}
OUT=$(dirname "$0")

# dataset.in_memory=False: the host pipeline's data stream, which the committed figures were
# made with (configs/cifar10.py draws its batches in memory since).
python -m resnet_jax sweep --config=configs/cifar10.py \
  --models=resnet20,resnet56 --workdir="$SWEEP_DIR" \
  --config.dataset.train_split='train[:5000]' \
  --config.dataset.in_memory=False \
  --config.dataset.eval_split='test[:2000]' \
  --config.dataset.test_split=test \
  --config.batch_size=64 \
  --config.optimizer.learning_rate=0.05 \
  --config.total_steps=1000 \
  --config.optimizer.boundaries='(500, 750)' \
  --config.log_every_steps=50 \
  --config.eval_every_steps=200 \
  --config.checkpoint_every_steps=500 \
  --config.eval_batch_size=500

python -m resnet_jax report --workdir="$SWEEP_DIR" --out="$OUT"
python -m resnet_jax tables  # the READMEs quote table.md
