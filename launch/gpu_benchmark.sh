#!/usr/bin/env bash
# Train-step benchmark on one GPU (H100/H200): ResNet-50 DeepLabv3+, crop 320,
# 8 labeled + 8 unlabeled images, float32 and bfloat16, supervised-only and
# full CAC (4 configurations, 10 timed steps each). Prints the table last and,
# if $OUT is set, writes $OUT/train_step_bench.json. Budget: under 4 minutes.
#
#   launch/gpu_benchmark.sh            # on the GPU machine, from anywhere
#   TINY=1 launch/gpu_benchmark.sh     # resnet_tiny, crop 64, 2+2, 2 steps,
#                                      # float32 only: a CPU check of the script
#
# Needs only jax (with CUDA), flax, optax and numpy: the benchmark imports no
# TensorFlow, clu or ml_collections and feeds synthetic batches. PYTHON picks
# the interpreter (default: python3, the GPU machine's python with jax).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import jax, flax, optax, numpy' 2>/dev/null; then
  echo "error: $PY cannot import jax, flax, optax and numpy; install them" \
       "(pip install -r requirements.txt) or set PYTHON=/path/to/python" >&2
  exit 2
fi

if [[ "${TINY:-0}" == 1 ]]; then
  ARGS=(--backbone=resnet_tiny --crop=64 --labeled=2 --unlabeled=2
        --dtype=float32 --steps=2 --warmup=1)
else
  # One compile per configuration (plus the DC-loss-alone timing in CAC
  # mode); the persistent cache makes a rerun on the same machine start fast.
  # DC loss on accelerators: 8192 negatives per chunk (7 loop steps per
  # direction instead of 50: the loop's per-step overhead dominated at 1024,
  # docs/benchmarks.md) and matmuls in the row's compute dtype.
  ARGS=(--backbone=resnet50 --crop=320 --labeled=8 --unlabeled=8
        "--dtype=float32,bfloat16" --steps=10 --warmup=2
        --chunk-size=8192 --dc-matmul-dtype=compute)
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/cac_jax/jax}"
fi
JSON=()
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  JSON=(--json="$OUT/train_step_bench.json")
fi
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
exec "$PY" -m cac_jax.bench.train_step "${ARGS[@]}" --modes=sup,cac "${JSON[@]}"
