"""The templates' example pictures reach Load Image's folder on a fresh install, and a user's file always wins."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from editkit.nodes import example_inputs
from packload import ROOT

SHIPPED = ROOT / "workflows" / "inputs"
SHIPPED_NAMES = sorted(p.name for p in SHIPPED.iterdir() if p.suffix.lower() == ".png")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_picture_a_template_loads_is_shipped():
    """Each LoadImage of each API workflow names a shipped example picture (else the copy could not help)."""
    import json

    wanted = set()
    for api in (ROOT / "workflows" / "api").glob("*.json"):
        for node in json.loads(api.read_text(encoding="utf-8")).values():
            if node["class_type"] == "LoadImage":
                wanted.add(node["inputs"]["image"])
    assert wanted and wanted <= {p.name for p in example_inputs.example_pictures()}


def test_fresh_input_folder_gets_every_example(tmp_path):
    target = tmp_path / "ComfyUI" / "input"  # not even created yet
    written = example_inputs.install_example_inputs(target)
    assert sorted(p.name for p in written) == SHIPPED_NAMES
    for name in SHIPPED_NAMES:
        assert digest(target / name) == digest(SHIPPED / name)
    assert sorted(os.listdir(target)) == SHIPPED_NAMES  # no temporary files left behind


def test_user_file_of_the_same_name_is_kept(tmp_path):
    name = SHIPPED_NAMES[0]
    (tmp_path / name).write_bytes(b"the user's own picture")
    written = example_inputs.install_example_inputs(tmp_path)
    assert (tmp_path / name).read_bytes() == b"the user's own picture"
    assert sorted(p.name for p in written) == SHIPPED_NAMES[1:]


def test_user_symlink_of_the_same_name_is_kept(tmp_path):
    name = SHIPPED_NAMES[0]
    (tmp_path / name).symlink_to(tmp_path / "elsewhere.png")  # dangling: still the user's entry
    example_inputs.install_example_inputs(tmp_path)
    assert (tmp_path / name).is_symlink() and os.readlink(tmp_path / name) == str(tmp_path / "elsewhere.png")


def test_second_start_changes_nothing(tmp_path):
    example_inputs.install_example_inputs(tmp_path)
    edited = tmp_path / SHIPPED_NAMES[0]
    edited.write_bytes(b"edited after the first start")
    assert example_inputs.install_example_inputs(tmp_path) == []
    assert edited.read_bytes() == b"edited after the first start"


def test_file_appearing_during_the_copy_is_not_replaced(tmp_path, monkeypatch):
    """The final step refuses to replace a file that another process created after the existence check."""
    name = SHIPPED_NAMES[0]
    real_copy = example_inputs.shutil.copyfile

    def copy_then_race(src, dst):
        real_copy(src, dst)
        if Path(dst).name == f".{name}.editkit-partial":
            (tmp_path / name).write_bytes(b"written by someone else meanwhile")

    monkeypatch.setattr(example_inputs.shutil, "copyfile", copy_then_race)
    written = example_inputs.install_example_inputs(tmp_path)
    assert (tmp_path / name).read_bytes() == b"written by someone else meanwhile"
    assert name not in [p.name for p in written]
    assert not any(p.name.endswith(".editkit-partial") for p in tmp_path.iterdir())


def test_unwritable_folder_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "input"
    blocker.write_text("a file where the folder should be")
    with caplog.at_level("WARNING", logger="EditKit"):
        assert example_inputs.install_example_inputs(blocker) == []
    assert "could not copy its example pictures" in caplog.text and str(SHIPPED) in caplog.text


def test_without_comfyui_nothing_is_written(monkeypatch):
    monkeypatch.setattr(example_inputs.comfy_bridge, "input_directory", lambda: None)
    assert example_inputs.install_example_inputs() == []


@pytest.mark.comfyui
def test_pack_import_inside_comfyui_filled_the_input_folder(comfyui):
    """ComfyInProcess points ComfyUI's input folder at an empty scratch folder before loading the pack."""
    folder = comfyui.startup_input_dir
    assert sorted(p.name for p in folder.iterdir()) == SHIPPED_NAMES
    for name in SHIPPED_NAMES:
        assert digest(folder / name) == digest(SHIPPED / name)
