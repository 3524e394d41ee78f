#!/usr/bin/env bash
# Train-step report on one GPU (H100/H200): ResNet-50 DeepLabv3+ OS16, crop
# 320, 8 labeled + 8 unlabeled images, bfloat16. Per step kind (supervised;
# CAC with the DC loss before and after active-anchor compaction and bf16
# matmuls): time, images/s, MFU by every-tap and real-pixel-tap FLOPs, the DC
# loss's share (alone, and in the step from a profile); the profile's top
# ops; the DC loss alone at VOC size for several variants. The table comes
# last; with $OUT set, also $OUT/gpu_report.json. (cac_jax/bench/gpu_report.py.)
# Budget: about 4-5 minutes (3 step compiles of ~40 s, 10 timed steps each).
#
#   launch/gpu_benchmark.sh            # on the GPU machine, from anywhere
#   TINY=1 launch/gpu_benchmark.sh     # resnet_tiny, crop 64, 2+2, 2 steps,
#                                      # float32: a CPU check of the script
#   launch/gpu_benchmark.sh --after-anchor-block=0.25 --after-chunk-size=51200
#                                      # other "after" settings (see --help)
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

ARGS=()
if [[ "${TINY:-0}" == 1 ]]; then
  ARGS=(--tiny)
fi
# The persistent cache makes a rerun on the same machine start fast, and the
# profiled step a cache hit of the timed one.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/cac_jax/jax}"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  ARGS+=(--json="$OUT/gpu_report.json")
fi
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
exec "$PY" -m cac_jax.bench.gpu_report "${ARGS[@]}" "$@"
