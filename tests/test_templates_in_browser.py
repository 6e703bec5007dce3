"""The templates in ComfyUI's real frontend (1.27.10), in headless Chromium: scripts/check_templates_in_browser.py.

Slow (5 minutes on a quiet 2-core machine, 12 under heavy load: it starts ComfyUI and opens every template
twice through the template browser), so it runs with ``-m slow``: thumbnails at card size, the missing-models
dialog when files are absent and its absence when they are present, every template's opening view at
1600x1000, the loader's message at queue time, and the node search words. Needs ``COMFYUI_ROOT`` (with ``EDITKIT_PYTHON``, the Python that runs it)
and Chromium (``apt-get install -y chromium``; ``.ci/run`` installs it when missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from packload import ROOT

pytestmark = pytest.mark.slow


def test_templates_in_the_real_frontend(tmp_path):
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        pytest.skip("set COMFYUI_ROOT (and EDITKIT_PYTHON) to a ComfyUI checkout to run the frontend checks")
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    python = os.environ.get("EDITKIT_PYTHON", sys.executable)
    result = subprocess.run(
        [python, str(ROOT / "scripts" / "check_templates_in_browser.py"), "--comfy-root", root, "--python", python,
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["problems"] == []
    templates = report["templates"]
    assert set(templates) == {p.stem for p in (ROOT / "workflows" / "api").glob("*.json")}
    assert templates["flux_fill_outpaint"]["missing_dialog"] and "vae / ae.safetensors" in \
        templates["flux_fill_outpaint"]["missing_dialog"]
    assert all(entry["scale"] > 0.5714 for entry in templates.values())
    shots = ("template_browser_1.png", "missing_models_flux_fill_outpaint.png", "queue_error_flux_fill_outpaint.png")
    assert all((tmp_path / name).stat().st_size > 10_000 for name in shots)
