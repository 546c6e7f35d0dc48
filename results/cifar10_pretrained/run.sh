#!/usr/bin/env bash
# The paper's Table 6 nets, trained (in PyTorch, on the original CIFAR-10, by
# akamaster/pytorch_resnet_cifar10), converted and evaluated here on the JPEG copy.
#
#   bash results/cifar10_pretrained/run.sh [RUNS_DIR]     (from the repository root, in .venv)
#
# Each net is an evaluation-only run (total_steps=0) started from its weights file with the
# normalisation it was trained with (ImageNet channel statistics on [0, 1] RGB): the converted
# state is saved at step 0 and its test error on all 10,000 JPEG test images written to
# metrics.jsonl. table.py then puts those beside the weights' published error on the original
# test set and the paper's; then the paper's Figure 7. About 10 minutes on the 2-core CPU.
set -euo pipefail
RUNS_DIR=${1:-${HOME}/.cache/resnet_jax/sweeps/cifar10_pretrained}
OUT=$(dirname "$0")
WEIGHTS=${WEIGHTS:-../shared/models/akamaster_cifar10}

# dataset.in_memory=False: the host pipeline's data stream, which the committed figures were
# made with (configs/cifar10.py draws its batches in memory since).
for depth in 20 32 44 56; do
  python train.py --config="configs/cifar10.py:resnet${depth}" --workdir="$RUNS_DIR/resnet${depth}" \
    --config.init_from="$WEIGHTS/resnet${depth}.safetensors" \
    --config.total_steps=0 \
    --config.dataset.normalization=imagenet \
    --config.dataset.train_split=train \
    --config.dataset.in_memory=False \
    --config.dataset.eval_split='test[:500]' \
    --config.dataset.test_split=test \
    --config.eval_batch_size=500
  mkdir -p "$OUT/runs/resnet${depth}"
  cp "$RUNS_DIR/resnet${depth}/metrics.jsonl" "$RUNS_DIR/resnet${depth}/config.json" \
    "$OUT/runs/resnet${depth}/"
done
python "$OUT/table.py" --runs="$OUT/runs" --weights="$WEIGHTS" --out="$OUT/table.md"

# The paper's Figure 7 for these trained ResNets, beside the plain nets trained on the CPU by
# results/cifar10_cpu/run.sh (its checkpoints are kept in SWEEP_DIR; those present are used).
SWEEP_DIR=${SWEEP_DIR:-${HOME}/.cache/resnet_jax/sweeps/cifar10_cpu}
for plain in plain20 plain56; do
  if grep -qs '"status": "finished"' "$SWEEP_DIR/$plain/run.json"; then
    ln -sfn "$SWEEP_DIR/$plain" "$RUNS_DIR/$plain"
  fi
done
python -m resnet_jax analysis --workdir="$RUNS_DIR" --out="$OUT"
python -m resnet_jax tables  # README.md quotes table.md
