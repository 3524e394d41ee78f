#!/usr/bin/env bash
# Single-GPU debug run: makes .venv if missing, installs jax[cuda] into it
# (once), trains configs/debug_gpu.py (ResNet-50 DeepLabv3+, embedded data,
# bf16, 300 steps) and serves TensorBoard on the workdir.
#
#   launch/gpu_debug.sh [WORKDIR] [extra --config.x=y flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-workdirs/debug_gpu}"
shift $(( $# < 1 ? $# : 1 ))
# shellcheck source=launch/venv.sh
source launch/venv.sh
cac_ensure_venv
PY=.venv/bin/python
JAX_VERSION="$(sed -n 's/^jax==//p' requirements.txt)"
if ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  .venv/bin/pip install -q "jax[cuda13]==$JAX_VERSION"
fi
.venv/bin/tensorboard --logdir "$WORKDIR" --port "${TB_PORT:-6006}" >/dev/null 2>&1 &
tb=$!
trap 'kill $tb 2>/dev/null || true' EXIT
echo "TensorBoard: http://localhost:${TB_PORT:-6006}"
"$PY" -m cac_jax.main --config=configs/debug_gpu.py --workdir="$WORKDIR" "$@"
