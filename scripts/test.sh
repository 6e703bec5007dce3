#!/usr/bin/env bash
# EditKit's test command (the README's, and what .ci/run calls): installs what it needs, lints, tests.
#   bash scripts/test.sh                 # the default suite (no GPU, no weights, no network but pip)
#   bash scripts/test.sh -m slow         # only the slow tests (full-size BEN2 forward, ...)
#   COMFYUI_ROOT=/path/to/ComfyUI EDITKIT_PYTHON=/path/to/comfy-venv/bin/python bash scripts/test.sh
#                                        # also run every workflow through ComfyUI's real executor
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
"$PYTHON" -m ruff check .
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
exec "$PYTHON" -m pytest "$@"
