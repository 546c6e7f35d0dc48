#!/usr/bin/env bash
# Every GPU measurement in one run, in stages that each fit a few minutes; results under $OUT.
#
#   bash benchmarks/gpu_suite.sh                          # on the GPU machine ($OUT set there)
#   SMALL=1 OUT=/tmp/out bash benchmarks/gpu_suite.sh     # the same stages, tiny, on a CPU
#
# Each stage runs in its own process under its own time limit (STAGE_SECONDS, default 180), its
# output goes to $OUT/<stage>.txt and its JSON record (the last line) to $OUT/<stage>.json, or
# {"stage": ..., "failed": exit code} when it fails: a failing stage (a peer out of memory, a
# timeout) is logged and the later stages still run. $OUT/summary.json lists every stage with
# its seconds and status. Needs only jax, flax, optax, torch and torchvision (what the GPU
# image has): no TensorFlow, tensorflow-datasets or Grain. The whole suite is meant to stay under
# 8 minutes on one H100/H200 (the first stages are the important ones).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/resnet_jax_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
# JAX must not take 75% of the GPU up front: torch peers run in the same machine.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Stages recompile the same steps (ours is the reference of every peer stage): cache them.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
# Latency-hiding scheduler: the XLA GPU flag that pays for convnets (ignored on a CPU).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
PY=${PYTHON:-python}
STAGE_SECONDS=${STAGE_SECONDS:-180}
SUMMARY="$OUT/summary.jsonl"
: > "$SUMMARY"

stage() {  # stage NAME COMMAND...: run it bounded and isolated, keep its output and record
  local name=$1
  shift
  local start=$SECONDS
  echo "== $name: $*"
  timeout --kill-after=10 "$STAGE_SECONDS" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  local seconds=$((SECONDS - start))
  tail -n 12 "$OUT/$name.txt"
  local last
  last=$(tail -n 1 "$OUT/$name.txt")
  if [ "$rc" -eq 0 ] && [ "${last:0:1}" = "{" ]; then
    echo "$last" > "$OUT/$name.json"
    echo "{\"stage\": \"$name\", \"seconds\": $seconds, \"ok\": true}" >> "$SUMMARY"
  else
    echo "{\"stage\": \"$name\", \"failed\": $rc}" > "$OUT/$name.json"
    echo "{\"stage\": \"$name\", \"seconds\": $seconds, \"ok\": false, \"exit\": $rc}" >> "$SUMMARY"
    echo "   stage $name failed (exit $rc after ${seconds}s; 124: over ${STAGE_SECONDS}s)"
  fi
}

(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
$PY -c 'import jax, torch; print(jax.__version__, jax.devices(), torch.__version__)' \
  > "$OUT/versions.txt" 2>&1 || true

if [ -n "${SMALL:-}" ]; then
  R50="--batch_size=4 --image_size=32 --steps=2"
  LOOP="--model=resnet20 --batch_size=8 --image_size=32 --steps=4"
  R20="--batch_size=8 --calls_steps=8"
  PROFILE="--model=resnet20 --batch_size=8 --image_size=32 --steps=2"
  MODELS=resnet20
else
  R50="--batch_size=256 --image_size=224 --steps=30"
  LOOP="--model=resnet50 --batch_size=256 --image_size=224 --steps=50"
  R20="--batch_size=128 --calls_steps=400"
  PROFILE="--model=resnet50 --batch_size=256 --image_size=224 --steps=5"
  MODELS=resnet20,resnet110,resnet50
fi

# ResNet-50 bf16 first: ours alone, then each peer in its own process beside ours (cached).
stage r50_bf16_ours $PY benchmarks/train_step.py --model=resnet50 --num_classes=1000 \
  --dtype=bfloat16 --peers= $R50
stage r50_bf16_flax $PY benchmarks/train_step.py --model=resnet50 --num_classes=1000 \
  --dtype=bfloat16 --peers=flax $R50
stage r50_bf16_torch $PY benchmarks/train_step.py --model=resnet50 --num_classes=1000 \
  --dtype=bfloat16 --peers=torch $R50
# The trainer's loop end to end: uint8 host batches, host-to-device, prefetch 0 and 2.
stage loop_prefetch $PY benchmarks/loop_throughput.py --dtype=bfloat16 $LOOP
# CIFAR steps: one per call, eight per call.
stage r20_steps_per_call $PY benchmarks/steps_per_call.py --model=resnet20 --ks=1,8 $R20
# A 5-step trace and the compiled step's memory.
stage profile $PY benchmarks/profile_step.py --out="$OUT/profile" --dtype=bfloat16 $PROFILE
stage compile_time $PY benchmarks/compile_time.py --models=$MODELS --steps=3

echo "done: results in $OUT"
cat "$SUMMARY"
