"""``batch`` against fake servers: spreading, resume, dead/hung servers, retries, kill -9, read-only inputs."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from client_helpers import client_env, png_bytes
from fake_comfy import FakeComfy, Faults, free_port
from PIL import Image

from client.batch import BatchRunner, picture_items, prompt_items
from client.comfy import Timeouts
from client.errors import WorkflowError
from client.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[2]
FAST = Timeouts(connect=2, request=2, poll=0.3, poll_ws_down=0.1, stall=3, heartbeat=1)


def tree_state(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def make_folder(root: Path, count: int) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(count):
        folder = root / "sub" if i % 2 else root
        (folder / f"p{i:02d}.png").write_bytes(png_bytes((i * 20 % 256, 100, 50)))
    return root


def runner(items, servers, out, **kw) -> BatchRunner:
    options = dict(workflow_name="ben2_remove_background", workflow=load_workflow("ben2_remove_background"),
                   items=items, urls=[s.url if hasattr(s, "url") else s for s in servers], out_dir=out,
                   timeouts=FAST, probe_interval=0.2, retry_base=0.05, progress=False)
    options.update(kw)
    return BatchRunner(**options)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR if path.is_dir() else stat.S_IRUSR)


def writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(stat.S_IRWXU)


def test_batch_over_two_servers_unicode_folders_read_only_and_resume(fake_pair, pictures, tmp_path):
    before = tree_state(pictures)
    read_only(pictures)
    out = tmp_path / "out"
    try:
        cmd = [sys.executable, "-m", "client", "batch", "ben2_remove_background", "--input", str(pictures),
               "--out", str(out), "--server", fake_pair[0].url, "--server", fake_pair[1].url, "--json"]
        done = subprocess.run(cmd, cwd=ROOT, env=client_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.splitlines()[-1])
        assert (summary["done"], summary["failed"], summary["skipped"]) == (3, 0, 0)
        records = manifest(out)
        assert sorted(Path(r["input"]).name for r in records) == ["a.png", "café.png", "лицо 1.png"]
        for record in records:
            assert record["status"] == "done" and record["prompt_id"] and len(record["outputs"]) == 2
            assert set(record["timings"]) >= {"queued_at", "run_s", "total_s"}
            for rel in record["outputs"]:
                assert (out / rel).is_file() and (out / rel).stat().st_mode & 0o777 == 0o644
        # names depend on the item only (<stem>_<node>_<n>): a rerun of an item overwrites, never adds
        assert sorted(r["outputs"] for r in records) == [
            ["a_4_1.png", "a_6_1.png"], ["портреты/été/café_4_1.png", "портреты/été/café_6_1.png"],
            ["портреты/лицо_1_4_1.png", "портреты/лицо_1_6_1.png"]]
        # the picture that went in is the one that came out (the fake inverts it)
        by_name = {Path(r["input"]).name: r for r in records}
        with Image.open(out / by_name["a.png"]["outputs"][0]) as cutout:
            assert cutout.getpixel((0, 0))[:3] == (0, 255, 255)
        again = subprocess.run(cmd, cwd=ROOT, env=client_env(), capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        summary = json.loads(again.stdout.splitlines()[-1])
        assert (summary["done"], summary["skipped"]) == (0, 3)
        assert len(manifest(out)) == 3
    finally:
        writable(pictures)
    assert tree_state(pictures) == before


def test_server_killed_mid_batch_items_move_and_it_rejoins(object_info, tmp_path):
    a = FakeComfy(object_info, faults=Faults(node_seconds=0.03)).start()
    b = FakeComfy(object_info, faults=Faults(node_seconds=0.03)).start()
    events: list = []
    state = {"killed": False}

    def emit(event):
        events.append(event)
        if event["event"] == "item_done" and event["server"] == a.url and not state["killed"]:
            state["killed"] = True

            def kill_and_revive():
                a.kill()
                time.sleep(1.0)
                a.revive()
            threading.Thread(target=kill_and_revive, daemon=True).start()

    items = picture_items([make_folder(tmp_path / "in", 24)])
    try:
        summary = asyncio.run(runner(items, [a, b], tmp_path / "out", emit=emit, in_flight=2).run())
    finally:
        a.stop()
        b.stop()
    records = manifest(tmp_path / "out")
    assert summary["done"] == 24 and summary["failed"] == 0
    keys = collections.Counter(r["item"] for r in records)
    assert len(keys) == 24 and set(keys.values()) == {1}
    kinds = [(e["event"], e.get("server")) for e in events]
    assert ("server_down", a.url) in kinds
    assert kinds.count(("server_up", a.url)) == 2  # at the start and after coming back
    back = kinds.index(("server_up", a.url), kinds.index(("server_down", a.url)))
    assert any(k == ("item_done", a.url) for k in kinds[back:]), "the revived server took no item"


def test_hung_server_items_go_to_the_other(object_info, tmp_path):
    a = FakeComfy(object_info, faults=Faults(node_seconds=0.05)).start()
    b = FakeComfy(object_info, faults=Faults(node_seconds=0.05)).start()
    threading.Timer(0.5, a.hang).start()
    items = picture_items([make_folder(tmp_path / "in", 10)])
    try:
        started = time.monotonic()
        summary = asyncio.run(runner(items, [a, b], tmp_path / "out").run())
        elapsed = time.monotonic() - started
    finally:
        a.stop()
        b.stop()
    assert summary["done"] == 10 and summary["failed"] == 0
    assert elapsed < 30
    per_server = {s["server"]: s for s in summary["servers"]}
    assert per_server[a.url]["went_down"] >= 1 and per_server[b.url]["done"] >= 5


def test_failing_item_is_retried_then_failed_and_the_batch_goes_on(fake, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "a red door"}, {"prompt": "FAIL on purpose", "id": "bad"},
        {"prompt": "a garden", "set": {"Repaint the background.steps": 3}}]) + "\n", encoding="utf-8")
    items = prompt_items(prompts)
    workflow = load_workflow("ben2_flux_fill_background")
    for item in items:
        item.picture = None
    out = tmp_path / "out"
    events: list = []
    # the workflow's LoadImage reads a picture already in the server's input folder
    fake.uploads["seed.png"] = png_bytes()
    workflow["2"]["inputs"]["image"] = "seed.png"
    fake.object_info["LoadImage"]["input"]["required"]["image"][0].append("seed.png")
    summary = asyncio.run(runner(items, [fake], out, workflow=workflow, workflow_name="ben2_flux_fill_background",
                                 max_failures=3, emit=events.append).run())
    assert (summary["done"], summary["failed"]) == (2, 1)
    records = {r["item"]: r for r in manifest(out)}
    bad = next(r for r in records.values() if r["status"] == "failed")
    assert bad["attempts"] == 3 and "node 5 'The new background'" in bad["error"] and "fake failure" in bad["error"]
    assert sum(1 for e in events if e["event"] == "item_retry") == 2
    garden = next(r for r in records.values() if r["prompt"] == "a garden")
    assert fake.history[garden["prompt_id"]]["prompt"][2]["6"]["inputs"]["steps"] == 3
    assert fake.history[garden["prompt_id"]]["prompt"][2]["5"]["inputs"]["prompt"] == "a garden"


def test_not_a_picture_fails_at_once_and_empty_folder_is_an_error(fake, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken.png").write_text("not really")
    (folder / "ok.png").write_bytes(png_bytes())
    summary = asyncio.run(runner(picture_items([folder]), [fake], tmp_path / "out").run())
    assert (summary["done"], summary["failed"]) == (1, 1)
    failed = [r for r in manifest(tmp_path / "out") if r["status"] == "failed"][0]
    assert failed["attempts"] == 1 and "is not a picture Pillow can read" in failed["error"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(WorkflowError, match="holds no pictures \\(1 other file"):
        picture_items([empty])


def test_unanswering_server_is_skipped_and_all_dead_is_an_error(fake, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    items = picture_items([make_folder(tmp_path / "in", 3)])
    summary = asyncio.run(runner(items, [dead, fake], tmp_path / "out").run())
    assert summary["done"] == 3
    assert {s["server"]: s["done"] for s in summary["servers"]} == {dead: 0, fake.url: 3}
    started = time.monotonic()
    stopped = asyncio.run(runner(items, [dead], tmp_path / "out2", give_up_after=1.0).run())
    assert time.monotonic() - started < 10
    assert (stopped["done"], stopped["left"]) == (0, 3)
    assert stopped["stopped"].startswith("no ComfyUI server answered for 1 s (--give-up-after)")


def test_server_lacking_a_model_is_dropped_with_the_reason(object_info, fake, tmp_path):
    import copy
    poor = copy.deepcopy(object_info)
    poor["EditKitBEN2Loader"]["input"]["required"]["model_name"][0] = ["other.pth"]
    with FakeComfy(poor) as lacking:
        items = picture_items([make_folder(tmp_path / "in", 4)])
        summary = asyncio.run(runner(items, [lacking, fake], tmp_path / "out").run())
    excluded = {s["server"]: s["excluded"] for s in summary["servers"]}
    assert summary["done"] == 4 and lacking.received == []
    assert "'BEN2_Base.safetensors' is not one of the server's values" in excluded[lacking.url]


@pytest.mark.parametrize("kill_after_lines", [1, 3])
def test_kill_9_mid_batch_leaves_nothing_half_written_and_resume_finishes(object_info, tmp_path, kill_after_lines):
    a = FakeComfy(object_info, faults=Faults(node_seconds=0.02)).start()
    folder = make_folder(tmp_path / "in", 12)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "client", "batch", "ben2_remove_background", "--input", str(folder), "--out",
           str(out), "--server", a.url, "--json"]
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=client_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        lines = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "manifest.jsonl").exists():
                lines = (out / "manifest.jsonl").read_bytes().count(b"\n")
                if lines >= kill_after_lines:
                    break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert lines >= kill_after_lines
        visible = [p for p in out.rglob("*") if p.is_file() and ".editkit-partial" not in p.parts]
        for path in visible:
            if path.suffix == ".png":
                with Image.open(path) as picture:
                    picture.load()  # a truncated file would raise here
        for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[:-1]:
            json.loads(line)
        done = subprocess.run(cmd, cwd=ROOT, env=client_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    finally:
        a.stop()
    records = manifest(out)
    done_keys = collections.Counter(r["item"] for r in records if r["status"] == "done")
    assert len(done_keys) == 12 and set(done_keys.values()) == {1}
    assert not any((out / ".editkit-partial").glob("*"))


def test_prompt_text_file_goes_to_the_only_prompt_input(fake, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na cat\n\na dog\na cat\n", encoding="utf-8")
    items = prompt_items(prompts)
    assert [i.input for i in items] == ["a cat", "a dog", "a cat"] and len({i.key for i in items}) == 3
    workflow = load_workflow("ben2_flux_fill_background")
    fake.uploads["seed.png"] = png_bytes()
    fake.object_info["LoadImage"]["input"]["required"]["image"][0].append("seed.png")
    workflow["2"]["inputs"]["image"] = "seed.png"
    summary = asyncio.run(runner(items, [fake], tmp_path / "out", workflow=workflow,
                                 workflow_name="ben2_flux_fill_background").run())
    assert summary["done"] == 3
    texts = sorted(fake.history[r["prompt_id"]]["prompt"][2]["5"]["inputs"]["prompt"] for r in manifest(tmp_path / "out"))
    assert texts == ["a cat", "a cat", "a dog"]


# -- exactly once ---------------------------------------------------------------------------------------------

# A batch run in a subprocess that dies (os._exit, as kill -9: no cleanup) at a chosen moment:
#   append:N   the N-th manifest append, before the line is written (the item's pictures are written already)
#   commit:N   the N-th commit, after its first picture moved into place (the line is written already)
KILLER = """
import os, sys
kind, n = sys.argv[1].split(":"); n = int(n); calls = [0]
def hit():
    calls[0] += 1
    if calls[0] == n:
        os._exit(9)
import client.manifest as manifest
if kind == "append":
    original = manifest.Manifest.append
    def append(self, record):
        hit()
        original(self, record)
    manifest.Manifest.append = append
else:
    import client.outputs as outputs
    real_replace = os.replace
    def commit(self, token, rels, replaced=()):
        def replace(src, dst):
            real_replace(src, dst)
            hit()
        outputs.os.replace = replace
        try:
            return original_commit(self, token, rels, replaced)
        finally:
            outputs.os.replace = real_replace
    original_commit = outputs.OutputStore.commit
    outputs.OutputStore.commit = commit
from client.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def output_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.jsonl")


def assert_exactly_once(out: Path, items: int, per_item: int) -> None:
    """Every item done once; every file in the output tree listed by the current records, once; no hidden folder."""
    records = manifest(out)
    last = {r["item"]: r for r in records}
    assert len(last) == items and all(r["status"] == "done" for r in last.values())
    listed = [rel for r in last.values() for rel in r["outputs"]]
    assert all(len(r["outputs"]) == per_item for r in last.values())
    assert sorted(listed) == output_files(out) and len(set(listed)) == len(listed)
    assert not [p for p in out.rglob(".*")], "a hidden folder or file stayed behind"
    for rel in listed:
        assert (out / rel).stat().st_mode & 0o777 == 0o644
        with Image.open(out / rel) as picture:
            picture.load()


@pytest.mark.parametrize("moment", ["append:3", "commit:2"])
def test_kill_between_writing_and_recording_then_resume_gives_each_output_once(object_info, tmp_path, moment):
    """Issue 18, item 2: a client killed after an item's pictures are written but before its manifest line (or
    after the line but before its pictures are all in place) and run again ends with 2 pictures per item, each
    listed once: leftovers are adopted or removed, never written a second time under another name."""
    fake = FakeComfy(object_info).start()
    folder = make_folder(tmp_path / "in", 6)
    out = tmp_path / "out"
    args = ["batch", "ben2_remove_background", "--input", str(folder), "--out", str(out), "--server", fake.url,
            "--json", "--in-flight", "1"]
    try:
        killed = subprocess.run([sys.executable, "-c", KILLER, moment, *args], cwd=ROOT, env=client_env(),
                                capture_output=True, text=True, timeout=60)
        assert killed.returncode == 9, killed.stderr
        done = subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, env=client_env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    finally:
        fake.stop()
    assert_exactly_once(out, items=6, per_item=2)


def test_killed_at_random_moments_then_resumed_gives_each_output_once(object_info, tmp_path):
    """kill -9 at random times (a fixed seed) three times over, then a full run: the same end state."""
    import random

    fake = FakeComfy(object_info, faults=Faults(node_seconds=0.01)).start()
    folder = make_folder(tmp_path / "in", 10)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "client", "batch", "ben2_remove_background", "--input", str(folder), "--out", str(out),
           "--server", fake.url, "--json"]
    rng = random.Random(18)
    try:
        for _ in range(3):
            proc = subprocess.Popen(cmd, cwd=ROOT, env=client_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30  # wait for the client to start working, then a random moment
            while time.monotonic() < deadline and not (out / "manifest.jsonl").exists() and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        done = subprocess.run(cmd, cwd=ROOT, env=client_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    finally:
        fake.stop()
    assert_exactly_once(out, items=10, per_item=2)


def test_redone_item_replaces_its_files(fake, tmp_path):
    """Other settings redo every item under the same names; files the old records listed and the new ones do not
    are removed, so the tree still holds exactly what the manifest lists."""
    folder = make_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    first = asyncio.run(runner(picture_items([folder]), [fake], out).run())
    assert first["done"] == 3
    workflow = load_workflow("ben2_remove_background")
    del workflow["6"]  # the mask picture is no longer saved
    second = asyncio.run(runner(picture_items([folder]), [fake], out, workflow=workflow).run())
    assert (second["done"], second["skipped"]) == (3, 0)
    assert_exactly_once(out, items=3, per_item=1)


def test_output_names_are_the_documented_pattern(fake, tmp_path):
    """docs/client.md gives the batch's output names; a picture and a JSONL prompt with an id follow it, and two
    pictures that would share a name in one folder (a.png, a.jpg) get distinct ones."""
    docs = (ROOT / "docs" / "client.md").read_text(encoding="utf-8")
    assert "`OUT/<sub-folders>/<stem>_<node>_<n>.<ext>`" in docs
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes((1, 2, 3)))
    Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "a.jpg")
    (folder / "b.png").write_bytes(png_bytes((4, 5, 6)))
    summary = asyncio.run(runner(picture_items([folder]), [fake], tmp_path / "out").run())
    assert summary["done"] == 3
    names = sorted(rel for r in manifest(tmp_path / "out") for rel in r["outputs"])
    assert names[-2:] == ["b_4_1.png", "b_6_1.png"]
    stems = {rel.rsplit("_", 2)[0] for rel in names[:-2]}
    assert len(stems) == 2 and all(s.startswith("a-") for s in stems)


def test_single_dead_server_gives_up_after_the_limit_with_a_message_that_fits(tmp_path):
    """Issue 18, item 8: one --server that never answers: no talk of "the other servers", and --give-up-after
    is honoured (the run waits for it that long, then stops with exit status 1 and says what to do)."""
    dead = f"http://127.0.0.1:{free_port()}"
    folder = make_folder(tmp_path / "in", 2)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "client", "batch", "ben2_remove_background", "--input", str(folder),
                           "--out", str(tmp_path / "out"), "--server", dead, "--give-up-after", "2",
                           "--probe-interval", "0.2"], cwd=ROOT, env=client_env(), capture_output=True, text=True,
                          timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert "other servers" not in done.stderr
    assert f"ComfyUI at {dead} does not answer" in done.stderr and "for up to 2 s (--give-up-after)" in done.stderr
    assert "stopped early: no ComfyUI server answered for 2 s (--give-up-after)" in done.stderr
    assert 2 <= elapsed < 30


def test_server_that_starts_late_is_waited_for(object_info, tmp_path):
    """The same limit works the other way: a server that comes up within it gets the whole batch."""
    port = free_port()
    late = FakeComfy(object_info, port=port)
    threading.Timer(1.0, late.start).start()
    try:
        summary = asyncio.run(runner(picture_items([make_folder(tmp_path / "in", 3)]), [f"http://127.0.0.1:{port}"],
                                     tmp_path / "out", give_up_after=20).run())
    finally:
        time.sleep(0.1)
        late.stop()
    assert (summary["done"], summary["stopped"]) == (3, None)
