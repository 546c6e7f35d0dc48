#!/usr/bin/env bash
# The CPU reproduction of the paper's Figure 6 (left: plain, right: residual) at a reduced budget.
#
#   bash results/cifar10_cpu/run.sh [SWEEP_DIR]     (from the repository root, in .venv)
#
# The paper's CIFAR-10 recipe (configs/cifar10.py) with three changes so four nets train in about
# an hour on the 2-core CPU: batch 64 (learning rate scaled to 0.05), 1,200 iterations instead of
# 64,000 with the two /10 steps at the same fractions (50% and 75%), and the curves' test error on
# the first 2,000 test images (the final row of the table is the whole 10,000). Data: the shared
# JPEG copy of CIFAR-10 (cifar10_jpeg), all 50,000 training images. Rerunning resumes; finished
# runs are skipped, so the second invocation only redraws the table and the figure.
set -euo pipefail
SWEEP_DIR=${1:-${HOME}/.cache/resnet_jax/sweeps/cifar10_cpu}
OUT=$(dirname "$0")

# dataset.in_memory=False: the host pipeline's data stream, which the committed figures were
# made with (configs/cifar10.py draws its batches in memory since).
python -m resnet_jax sweep --config=configs/cifar10.py \
  --models=plain20,plain56,resnet20,resnet56 --workdir="$SWEEP_DIR" \
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
# The paper's Figure 7 from the same runs' final checkpoints (the sweep keeps them).
python -m resnet_jax analysis --workdir="$SWEEP_DIR" --out="$OUT"
python -m resnet_jax tables  # the READMEs quote table.md
