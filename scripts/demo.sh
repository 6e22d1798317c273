#!/usr/bin/env bash
# Install, then run the main job on this CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/demo}
exec "${PYTHON:-python3}" -m nablagfn bench gmm --spec benchmarks/gmm_ring8.json --out "$OUT/gmm_ring8" "$@"
