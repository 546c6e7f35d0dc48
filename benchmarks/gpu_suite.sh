#!/usr/bin/env bash
# Every GPU measurement of the performance issue in one run; results under $OUT.
#
#   bash benchmarks/gpu_suite.sh            # on the GPU machine (the device tool sets $OUT)
#   SMALL=1 OUT=/tmp/out bash benchmarks/gpu_suite.sh   # the same steps, tiny, on a CPU
#
# Needs only jax, flax, optax, torch and torchvision (what the GPU image has): the benchmarks
# import no data or config stack. Each line of output is also saved as a file under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/resnet_jax_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
# Latency-hiding scheduler and autotuning: the XLA GPU flags that pay for convnets.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_autotune_level=4"
PY=${PYTHON:-python}

(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
$PY -c 'import jax, torch; print(jax.__version__, jax.devices(), torch.__version__)' | tee "$OUT/versions.txt"

if [ -n "${SMALL:-}" ]; then
  R50="--batch_size=4 --image_size=64 --steps=2"
  R20="--batch_size=8 --image_size=32 --steps=2"
  MODELS=resnet20,resnet110
else
  R50="--batch_size=256 --image_size=224 --steps=30"
  R20="--batch_size=128 --image_size=32 --steps=200"
  MODELS=resnet20,resnet56,resnet110,resnet1202,resnet50,resnet152
fi
$PY benchmarks/train_step.py --model=resnet50 --num_classes=1000 --dtype=bfloat16 $R50 \
  | tee "$OUT/train_step_resnet50_bf16.txt"
$PY benchmarks/train_step.py --model=resnet50 --num_classes=1000 --dtype=float32 $R50 \
  | tee "$OUT/train_step_resnet50_fp32.txt"
$PY benchmarks/train_step.py --model=resnet20 $R20 | tee "$OUT/train_step_resnet20.txt"
$PY benchmarks/train_step.py --model=resnet20 --dtype=bfloat16 $R20 \
  | tee "$OUT/train_step_resnet20_bf16.txt"
$PY benchmarks/compile_time.py --models=$MODELS --skip_unrolled=resnet1202 \
  | tee "$OUT/compile_time.txt"
echo "done: results in $OUT"
