#!/usr/bin/env bash
# Install, then run the main job on this CPU machine: `nablagfn train` with no arguments, i.e. the
# digits demo (a DDPM trained on sklearn digits, reward log p(3 | x)) through the distributed service
# (embedded Redis, local Ray, 2 sampler actors, a reward worker, the learner), then its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/demo}
exec "${PYTHON:-python3}" -m nablagfn train --run-dir "$OUT" "$@"
