#!/usr/bin/env bash
# Sourced by launch/train.sh and launch/test.sh: makes sure .venv (at the
# repository root) exists and holds requirements.txt, installing only what is
# missing. A stamp (the sha256 of requirements.txt) records a finished
# install, so a venv whose requirements changed, or whose install was
# interrupted, is brought up to date on the next call. Set CAC_PYTHON to the
# Python 3.12 to build it with (default: python3.12 on the PATH, else a pyenv
# 3.12, else python3 if it is 3.12).
set -euo pipefail

_cac_find_python() {
  local candidate version
  if [[ -n "${CAC_PYTHON:-}" ]]; then
    echo "$CAC_PYTHON"
    return
  fi
  if command -v python3.12 >/dev/null 2>&1 && python3.12 --version >/dev/null 2>&1; then
    echo python3.12
    return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    version="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | tail -n 1 || true)"
    if [[ -n "$version" ]]; then
      echo "$(pyenv root)/versions/$version/bin/python3.12"
      return
    fi
  fi
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "error: no Python 3.12 found (python3.12, pyenv 3.12.x, python3); install" \
       "one, or set CAC_PYTHON=/path/to/python3.12" >&2
  return 2
}

cac_ensure_venv() {
  local stamp want python
  stamp=.venv/.requirements.sha256
  want="$(sha256sum requirements.txt | cut -d' ' -f1)"
  if [[ -x .venv/bin/python && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  # A venv that is missing, half made (no pip) or not Python 3.12 is made anew.
  if ! .venv/bin/python -c 'import pip, sys; sys.exit(sys.version_info[:2] != (3, 12))' \
       >/dev/null 2>&1; then
    python="$(_cac_find_python)"
    echo "creating .venv with $python ($("$python" --version 2>&1))" >&2
    "$python" -m venv --clear .venv
  fi
  echo "installing requirements.txt into .venv (a few minutes, once)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
}
