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
    from tiny import make_tree

    out = tmp_path_factory.mktemp("models")
    make_tree(out)
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
        if os.environ.get(REQUIRE_COMFYUI) == "1":
            pytest.fail(f"{REQUIRE_COMFYUI}=1 but COMFYUI_ROOT is not set: CI must run ComfyUI's executor")
        pytest.skip("set COMFYUI_ROOT to a ComfyUI checkout to run ComfyUI's executor "
                    "(.ci/run does it with ../shared/tools/comfyui-cpu/setup.sh)")
    from comfy_inprocess import ComfyInProcess

    instance = ComfyInProcess.get(root)
    instance.use_models(tiny_models)
    instance.use_inputs(ROOT / "workflows" / "inputs")
    return instance


@pytest.fixture(scope="session")
def small_inputs(tmp_path_factory) -> Path:
    """Every ``workflows/inputs`` picture under its own name, shrunk (``workflow_runner.small_size``), so workflow
    tests exercise the shipped graphs without spending minutes on 768-pixel pictures."""
    from PIL import Image

    from workflow_runner import small_size

    out = tmp_path_factory.mktemp("small_inputs")
    for picture in sorted((ROOT / "workflows" / "inputs").iterdir()):
        if picture.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            with Image.open(picture) as image:
                image.resize(small_size(*image.size), Image.Resampling.LANCZOS).save(out / f"{picture.stem}.png")
    return out


# --------------------------------------------------------------------------------------------------------------
# Which tests ran through ComfyUI's real executor: counted and reported, and required in CI.

REQUIRE_COMFYUI = "EDITKIT_REQUIRE_COMFYUI"  # .ci/run sets it: a skipped real-executor test fails the run
_executor_tests: set[str] = set()
_executor_outcomes: dict[str, str] = {}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfyui" in getattr(item, "fixturenames", ()) or item.get_closest_marker("comfyui"):
            _executor_tests.add(item.nodeid)
            if not item.get_closest_marker("comfyui"):
                item.add_marker(pytest.mark.comfyui)


def pytest_runtest_logreport(report):
    if report.nodeid not in _executor_tests:
        return
    if report.when == "call" or report.outcome != "passed":
        _executor_outcomes.setdefault(report.nodeid, report.outcome)


def _executor_counts() -> tuple[int, int, int]:
    outcomes = list(_executor_outcomes.values())
    return outcomes.count("passed"), outcomes.count("skipped"), outcomes.count("failed")


def pytest_sessionfinish(session, exitstatus):
    passed, skipped, _failed = _executor_counts()
    if os.environ.get(REQUIRE_COMFYUI) == "1" and (skipped or not passed):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _executor_outcomes and os.environ.get(REQUIRE_COMFYUI) != "1":
        return
    passed, skipped, failed = _executor_counts()
    root = os.environ.get("COMFYUI_ROOT")
    line = f"{passed} tests ran through ComfyUI's real executor"
    if root:
        line += f" (COMFYUI_ROOT={root}; {failed} failed, {skipped} skipped)"
    else:
        line += f": COMFYUI_ROOT is not set, {skipped} real-executor tests skipped"
    terminalreporter.write_sep("=", line, bold=True, red=bool(failed or (skipped and root)))
    if os.environ.get(REQUIRE_COMFYUI) == "1" and (skipped or not passed):
        terminalreporter.write_line(f"{REQUIRE_COMFYUI}=1: every real-executor test must run; this run fails.",
                                    red=True)


__all__ = ["ROOT"]


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny matmuls on a
    busy 2-core machine run far faster without OpenMP's hand-off between threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
