#!/usr/bin/env bash
# The main job on the embedded default: fit on the textile training split and evaluate, printing the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/patchcore evaluate textile -o runs/textile "$@"
