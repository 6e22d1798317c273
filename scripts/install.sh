#!/usr/bin/env bash
# Install nablagfn (editable) with the CPU torch pinned: constraints.txt keeps pip from pulling a
# CUDA torch (shared/design/STACK.md). Idempotent: re-running installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q -c constraints.txt "torch==2.13.0"
"$PY" -m pip install -q -c constraints.txt -e ".[test]"
