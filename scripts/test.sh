#!/usr/bin/env bash
# EditKit's test command (the README's, and what .ci/run calls): installs what it needs, lints, tests.
#   bash scripts/test.sh                 # the default suite (no GPU, no weights, no network but pip)
#   bash scripts/test.sh -m slow         # only the slow tests (full-size BEN2 forward, ...)
#   COMFYUI_ROOT=/path/to/ComfyUI EDITKIT_PYTHON=/path/to/comfy-venv/bin/python bash scripts/test.sh
#                                        # also run every workflow through ComfyUI's real executor
# Without COMFYUI_ROOT the real-executor tests skip and say why; EDITKIT_REQUIRE_COMFYUI=1 (set by .ci/run)
# turns such a skip into a failure. The summary ends with "N tests ran through ComfyUI's real executor".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
"$PYTHON" -m ruff check .
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
status=0
"$PYTHON" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests (exit code 5); check the arguments: $*" >&2
fi
exit "$status"
