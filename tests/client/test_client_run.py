"""``python -m client run`` as a user runs it (a subprocess) against fake ComfyUI servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from client_helpers import client_env, png_bytes
from fake_comfy import free_port

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "client", *map(str, args)], cwd=ROOT, env=client_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_run_uploads_sets_by_title_and_saves_outputs_with_the_prompt_id(fake, tmp_path):
    picture = tmp_path / "in.png"
    picture.write_bytes(png_bytes((255, 255, 0)))
    out = tmp_path / "out"
    done = cli("run", "ben2_flux_fill_background", "--server", fake.url, "--image", f"Picture={picture}",
               "--set", "Repaint the background.steps=2", "--set", "5.prompt=a beach", "--out", out, "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    saved = events[-1]
    assert saved["event"] == "saved" and len(saved["files"]) == 1
    path = Path(saved["files"][0])
    assert path.parent == out and saved["prompt_id"] in path.name
    assert path.read_bytes() == fake.files[next(iter(fake.files))]
    queued = json.loads(json.dumps(fake.history[saved["prompt_id"]]["prompt"][2]))
    assert queued["6"]["inputs"]["steps"] == 2 and queued["5"]["inputs"]["prompt"] == "a beach"
    assert queued["2"]["inputs"]["image"] in fake.uploads
    assert [e["event"] for e in events].count("progress") == 2
    assert not list(out.glob(".editkit-partial/*"))


def test_run_reports_a_node_failure_readably(fake, tmp_path):
    picture = tmp_path / "in.png"
    picture.write_bytes(png_bytes())
    done = cli("run", "ben2_flux_fill_background", "--server", fake.url, "--image", f"2={picture}",
               "--set", "5.prompt=FAIL please", "--out", tmp_path / "out")
    assert done.returncode == 1
    assert "error: node 5 'The new background' (EditKitFluxTextEncode) failed on ComfyUI at" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.png"))


def test_run_skips_a_dead_server_and_uses_the_next(fake, tmp_path):
    picture = tmp_path / "in.png"
    picture.write_bytes(png_bytes())
    dead = f"http://127.0.0.1:{free_port()}"
    done = cli("run", "ben2_remove_background", "--server", dead, "--server", fake.url, "--image", f"2={picture}",
               "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert f"skipping: ComfyUI at {dead} does not answer" in done.stderr
    assert len(done.stdout.splitlines()) == 2  # cut-out and mask


def test_run_bad_input_messages(fake, tmp_path):
    not_picture = tmp_path / "fake.png"
    not_picture.write_text("hello")
    ui_format = ROOT / "workflows" / "ben2_remove_background.json"
    cases = [
        (("run", "no_such_workflow"), "no bundled workflow named 'no_such_workflow'. Bundled workflows: "),
        (("run", ui_format, "--server", fake.url), "is a UI-format workflow"),
        (("run", "ben2_remove_background", "--server", fake.url, "--set", "Nope.steps=1"), "no node with id or title 'Nope'"),
        (("run", "ben2_remove_background", "--server", fake.url, "--set", "3.stepz=1"), "has no input 'stepz'"),
        (("run", "ben2_remove_background", "--server", fake.url, "--image", f"2={not_picture}"),
         "is not a picture Pillow can read"),
        (("run", "ben2_remove_background", "--server", fake.url), "pass it with --image NODE=PATH"),
        (("run", "ben2_remove_background", "--server", f"http://127.0.0.1:{free_port()}"), "no ComfyUI server answers"),
    ]
    for args, expected in cases:
        done = cli(*args)
        assert done.returncode == 1, (args, done.stderr)
        assert expected in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert fake.received == []
