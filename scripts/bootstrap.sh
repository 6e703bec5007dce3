# Sourced by test.sh and smoke.sh: sets PYTHON to an interpreter with EditKit's dependencies.
#
# EDITKIT_PYTHON=/path/to/python  use that interpreter (e.g. ComfyUI's venv) with its packages as they are;
#                                  only the test tools (pytest, ruff) are added if it lacks them.
# EDITKIT_VENV=dir                 virtualenv to create/reuse (default .venv in the repository).
# requirements-client.txt (the batch client's dependencies) and requirements-ray.txt (the client on a Ray cluster,
# tests/client/test_ray.py) are installed too.
# torch is installed first as torch==2.13.0 (on the CI machine this resolves to its local CPU wheel),
# then the requirements with torch pinned, so nothing swaps torch for another build.
set -euo pipefail
if [ -n "${EDITKIT_PYTHON:-}" ]; then
  PYTHON="$EDITKIT_PYTHON"
  if ! "$PYTHON" -c "import pytest, ruff" >/dev/null 2>&1; then
    echo "adding the test tools (requirements-dev.txt) to $PYTHON" >&2
    "$PYTHON" -m pip install --quiet -r requirements-dev.txt
  fi
  if [ -f requirements-client.txt ] && ! "$PYTHON" -c "import aiohttp, tqdm, yaml, PIL" >/dev/null 2>&1; then
    echo "adding the client's requirements (requirements-client.txt) to $PYTHON" >&2
    "$PYTHON" -m pip install --quiet -r requirements-client.txt
  fi
  if [ -f requirements-ray.txt ] && ! "$PYTHON" -c "import ray.cluster_utils" >/dev/null 2>&1; then
    echo "adding Ray (requirements-ray.txt) to $PYTHON" >&2
    "$PYTHON" -m pip install --quiet -r requirements-ray.txt
  fi
else
  VENV="${EDITKIT_VENV:-.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  PYTHON="$VENV/bin/python"
  if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==${EDITKIT_TORCH_VERSION:-2.13.0}"
  fi
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  "$PYTHON" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
  client=()
  [ -f requirements-client.txt ] && client=(-r requirements-client.txt)  # the batch client (client/, tests/client/)
  [ -f requirements-ray.txt ] && client+=(-r requirements-ray.txt)  # the client on a Ray cluster
  "$PYTHON" -m pip install --quiet -c "$constraints" -r requirements.txt -r requirements-dev.txt "${client[@]}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
