#!/usr/bin/env bash
# The README's test command (and CI's): makes .venv if it is missing
# (launch/venv.sh), then runs the suite on 2 workers. Extra arguments go to
# pytest, e.g. tests/test_config.py.
#
#   bash launch/test.sh [pytest arguments ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/venv.sh
source launch/venv.sh
cac_ensure_venv
if [[ $# -eq 0 ]]; then
  set -- tests
fi
exec .venv/bin/python -m pytest -q -n 2 "$@"
