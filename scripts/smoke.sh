#!/usr/bin/env bash
# Smoke run on a fresh machine: no ComfyUI, no weights, no GPU. Installs what it needs, writes tiny
# random models, runs every bundled workflow unchanged and saves the pictures (noise: random weights).
#   bash scripts/smoke.sh [OUT_DIR]      (default: smoke-output/)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
exec "$PYTHON" scripts/smoke.py "$@"
