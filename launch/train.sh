#!/usr/bin/env bash
# The README's main job: makes .venv if it is missing (launch/venv.sh), then
# trains configs/default.py into workdirs/default. Rerun to resume. Extra
# arguments are passed on to cac_jax.main, e.g. --config.total_steps=40; it
# runs from the repository root, so relative paths in them are taken from
# there.
#
#   bash launch/train.sh [--config.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/venv.sh
source launch/venv.sh
cac_ensure_venv
exec .venv/bin/python -m cac_jax.main --config=configs/default.py \
  --workdir=workdirs/default "$@"
