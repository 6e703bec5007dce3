"""Fixtures for the client's tests: fake ComfyUI servers that know EditKit's real node specs.

The fake servers' ``/object_info`` is built from the pack's own ``INPUT_TYPES`` (loaded by the
parent conftest) plus the native nodes the bundled workflows use, with the model file names of the
tiny models tree, so validation in these tests sees what a real server with EditKit would report.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_helpers import png_bytes  # noqa: E402
from fake_comfy import FakeComfy, minimal_object_info  # noqa: E402


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def editkit_object_info() -> dict:
    """``/object_info`` as ComfyUI builds it (``server.node_info``) for EditKit's nodes + natives.

    Combo lists of model files are what a server's models folders hold; here they also list every
    value the bundled workflows use, as a server with all the models installed would.
    """
    import editkit
    from client.workflow import BUNDLED_DIR, bundled_names, is_link, load_workflow

    used: dict[tuple[str, str], set] = {}
    for name in bundled_names(BUNDLED_DIR):
        for node in load_workflow(name).values():
            for input_name, value in node["inputs"].items():
                if isinstance(value, str) and not is_link(value):
                    used.setdefault((node["class_type"], input_name), set()).add(value)
    info = minimal_object_info()
    info["MaskToImage"] = {"input": {"required": {"mask": ["MASK", {}]}}, "output": ["IMAGE"], "output_node": False}
    info["InvertMask"] = {"input": {"required": {"mask": ["MASK", {}]}}, "output": ["MASK"], "output_node": False}
    for name, cls in editkit.NODE_CLASS_MAPPINGS.items():
        spec = _jsonable(cls.INPUT_TYPES())
        for section in spec.values():
            if not isinstance(section, dict):
                continue
            for input_name, raw in section.items():
                if isinstance(raw, list) and raw and isinstance(raw[0], list):
                    raw[0] = sorted({str(c) for c in raw[0]} | used.get((name, input_name), set()))
        info[name] = {"input": spec, "output": list(cls.RETURN_TYPES),
                      "output_node": bool(getattr(cls, "OUTPUT_NODE", False)), "name": name}
    return info


@pytest.fixture(scope="session")
def object_info() -> dict:
    return editkit_object_info()


@pytest.fixture()
def fake(object_info):
    with FakeComfy(copy.deepcopy(object_info)) as server:
        yield server


@pytest.fixture()
def fake_pair(object_info):
    first, second = FakeComfy(copy.deepcopy(object_info)).start(), FakeComfy(copy.deepcopy(object_info)).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture()
def pictures(tmp_path) -> Path:
    """A read-only folder of pictures with a non-ASCII sub-folder and names (read-only is checked by tests)."""
    root = tmp_path / "inputs"
    (root / "портреты" / "été").mkdir(parents=True)
    (root / "a.png").write_bytes(png_bytes((255, 0, 0)))
    (root / "портреты" / "лицо 1.png").write_bytes(png_bytes((0, 255, 0)))
    (root / "портреты" / "été" / "café.png").write_bytes(png_bytes((0, 0, 255)))
    (root / "notes.txt").write_text("not a picture")
    return root

