#!/usr/bin/env bash
# The formatter and linter check that CI runs (ruff, pinned in
# requirements.txt, configured in pyproject.toml). Makes .venv if it is
# missing. To apply the fixes instead of checking:
#
#   .venv/bin/ruff format . && .venv/bin/ruff check --fix .
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/venv.sh
source launch/venv.sh
cac_ensure_venv
.venv/bin/ruff format --check .
.venv/bin/ruff check .
