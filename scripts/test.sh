#!/usr/bin/env bash
# Install, then run the whole test suite (CPU only, real Redis/Ray/diffusers modules).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m pytest -q "$@"
