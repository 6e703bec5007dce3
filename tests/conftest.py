"""Test setup: offline, the pack loaded as a package, and a shared tree of tiny models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from packload import ROOT, load_pack, offline  # noqa: E402

offline()
load_pack()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A ComfyUI-style models tree with every tiny model, generated once per test session."""
    from make_tiny_models import make_tiny_models

    out = tmp_path_factory.mktemp("models")
    make_tiny_models(out)
    return out


@pytest.fixture()
def models_root(tiny_models):
    """Point the pack's model folders at the tiny tree (without ComfyUI) for one test."""
    from editkit.nodes import comfy_bridge

    comfy_bridge.set_models_root(tiny_models)
    yield tiny_models
    comfy_bridge.set_models_root(None)


@pytest.fixture()
def torch_runtime():
    """An interruptible plain-torch runtime on the CPU, installed as the pack's runtime."""
    from editkit.nodes import comfy_bridge
    from editkit.pipelines.core.runtime import TorchRuntime

    runtime = TorchRuntime("cpu")
    comfy_bridge.set_runtime(runtime)
    yield runtime
    comfy_bridge.set_runtime(None)


@pytest.fixture(scope="session")
def comfyui(tiny_models):
    """ComfyUI's real executor in this process, with EditKit loaded (only when COMFYUI_ROOT is set)."""
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        pytest.skip("set COMFYUI_ROOT to a ComfyUI checkout to run ComfyUI's executor")
    from comfy_inprocess import ComfyInProcess

    instance = ComfyInProcess.get(root)
    instance.use_models(tiny_models)
    instance.use_inputs(ROOT / "workflows" / "inputs")
    return instance


__all__ = ["ROOT"]
