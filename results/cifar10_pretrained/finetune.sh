#!/usr/bin/env bash
# What the JPEG copy costs the trained nets, and whether a short fine-tuning on the copy wins it
# back: each converted net (see run.sh) trained further on the copy's 45k training split
# (train_45k) with its own weights as the start (config.init_from), then evaluated again on all
# 10,000 JPEG test images.
#
#   bash results/cifar10_pretrained/finetune.sh [RUNS_DIR] [STEPS]   (repository root, .venv)
#
# The budget is small on purpose (the 2-core CPU, next to the test suite): STEPS iterations
# (default 100) at batch 64, a constant learning rate of 0.001 (the nets ended their own
# training at 0.001), the paper's momentum and weight decay, the weights' own normalisation.
# table.py then writes finetune.md: before (run.sh's evaluation), after, and the change.
set -euo pipefail
RUNS_DIR=${1:-${HOME}/.cache/resnet_jax/sweeps/cifar10_pretrained_finetune}
STEPS=${2:-100}
OUT=$(dirname "$0")
WEIGHTS=${WEIGHTS:-../shared/models/akamaster_cifar10}

# dataset.in_memory=False: the host pipeline's data stream, which the committed figures were
# made with (configs/cifar10.py draws its batches in memory since).
for depth in 20 32 44 56; do
  python train.py --config="configs/cifar10.py:resnet${depth}" --workdir="$RUNS_DIR/resnet${depth}" \
    --config.init_from="$WEIGHTS/resnet${depth}.safetensors" \
    --config.dataset.normalization=imagenet \
    --config.dataset.train_split=train_45k \
    --config.dataset.in_memory=False \
    --config.dataset.eval_split='test[:500]' \
    --config.dataset.test_split=test \
    --config.batch_size=64 \
    --config.optimizer.learning_rate=0.001 \
    --config.optimizer.schedule=constant \
    --config.optimizer.boundaries='()' \
    --config.total_steps="$STEPS" \
    --config.log_every_steps=25 \
    --config.eval_every_steps="$STEPS" \
    --config.checkpoint_every_steps="$STEPS" \
    --config.eval_batch_size=500
  mkdir -p "$OUT/finetuned/resnet${depth}"
  cp "$RUNS_DIR/resnet${depth}/metrics.jsonl" "$RUNS_DIR/resnet${depth}/config.json" \
    "$OUT/finetuned/resnet${depth}/"
done
python "$OUT/table.py" --runs="$OUT/runs" --weights="$WEIGHTS" --out="$OUT/table.md" \
  --finetuned="$OUT/finetuned" --finetuned_out="$OUT/finetune.md"
python -m resnet_jax tables
