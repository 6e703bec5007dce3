"""Import the repository root as the package ``editkit``, the way ComfyUI imports a pack.

Used by the test suite and by the scripts that run from the repository root, so the pack is
never put on ``sys.path`` as loose modules (ComfyUI has its own top-level ``nodes``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root: the pack itself
PACK_NAME = "editkit"


def offline() -> None:
    """No hub look-ups, ever (they would retry for ~20 s before failing)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_pack():
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    offline()
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module


def pack_module(name: str):
    """Import ``editkit.<name>`` (e.g. ``pipelines.flux_layout``), loading the pack first."""
    import importlib

    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")
