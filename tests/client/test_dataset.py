"""The edit-dataset factory in mock mode: the whole flow, QA, exports, resume after kills, read-only sources."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from client.__main__ import main
from client.dataset import export as export_stage
from client.dataset import imaging, mock
from client.dataset.config import load_config
from client.errors import ClientError

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = ("人物物体一致性", "物体一致性", "物理变化")
EXPECTED_FAIL = {"blank": "blank", "copy": "near_copy", "resized": "size", "leak": "outside_mask"}


def _picture(seed: int, h: int, w: int) -> Image.Image:
    """A smooth random picture (distinct perceptual hashes per seed, like photos)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((4, 4, 3))
    big = np.kron(coarse, np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    big = 0.6 * big + 0.4 * np.stack([yy, xx, (yy + xx) / 2], -1)
    return Image.fromarray((big * 255).astype(np.uint8), "RGB")


def instructions_covering_bad_kinds(sample_id: str, count: int) -> list[str]:
    """``count`` instructions that include every bad kind of the mock at least once for ``sample_id``."""
    chosen, kinds = [], set()
    i = 0
    while len(kinds) < len(mock.BAD_KINDS) or len(chosen) < count:
        text = f"recolour the jacket variant {i}"
        kind = mock.bad_kind(sample_id, text)
        if kind is not None and kind not in kinds:
            kinds.add(kind)
            chosen.append(text)
        elif kind is None and len(chosen) < count:
            chosen.append(text)
        i += 1
    return chosen


def make_tree(root: Path, samples: int = 9, size=(72, 88)) -> dict:
    """Categories with Chinese names, a naming mistake, a corrupt picture, a duplicate id, an empty category,
    an empty instruction file and a duplicate picture."""
    data = root / "data"
    ids = []
    for i in range(samples):
        category = CATEGORIES[i % 3]
        sample_id = f"{i:04d}_image_{100 + i}"
        folder = data / category / sample_id
        folder.mkdir(parents=True)
        _picture(i, *size).save(folder / f"{sample_id}.png")
        if category == "人物物体一致性":
            (folder / f"{sample_id}.txt").write_text("给人物换一件红色外套\nadd a water bottle\n", encoding="utf-8")
        ids.append(sample_id)
    rich = data / "物体一致性" / "0100_rich"
    rich.mkdir(parents=True)
    _picture(100, *size).save(rich / "0100_rich.png")
    (rich / "0100_rich.json").write_text(json.dumps(instructions_covering_bad_kinds("0100_rich", 6)),
                                         encoding="utf-8")
    bad_name = data / "物理变化" / "0200_x"
    bad_name.mkdir(parents=True)
    _picture(200, *size).save(bad_name / "wrong_name.png")
    corrupt = data / "物体一致性" / "0201_broken"
    corrupt.mkdir(parents=True)
    (corrupt / "0201_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    dup = data / "物理变化" / ids[0]
    dup.mkdir(parents=True)
    _picture(0, *size).save(dup / f"{ids[0]}.png")
    (data / "空类别").mkdir()
    empty = data / "人物物体一致性" / "0202_empty"
    empty.mkdir(parents=True)
    _picture(202, *size).save(empty / "0202_empty.png")
    (empty / "0202_empty.txt").write_text("\n", encoding="utf-8")
    twin = data / "物理变化" / "0203_twin"
    twin.mkdir(parents=True)
    _picture(1, *size).save(twin / "0203_twin.png")  # same content as sample 1
    return {"data": data, "ids": ids}


def write_config(root: Path, data: Path, **extra) -> Path:
    config = {"outputs": str(root / "outputs"), "inputs": {"roots": [str(data)]},
              "instructions": {"templates": {"物体一致性": ["remove the glasses"], "物理变化": ["make it wet"]}},
              "export": {"validation_percent": 30}, **extra}
    path = root / "factory.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def digest_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_factory(config: Path, *extra: str) -> int:
    return main(["dataset", "--config", str(config), "--mock", *extra])


@pytest.fixture()
def built(tmp_path):
    tree = make_tree(tmp_path)
    config = write_config(tmp_path, tree["data"])
    assert run_factory(config) == 0
    report = json.loads((tmp_path / "outputs" / "reports" / "qa" / "report.json").read_text(encoding="utf-8"))
    return {"root": tmp_path, "config": config, "report": report, **tree}


def test_ingest_problems_are_reported_not_fatal(built):
    summary = built["report"]["summary"]
    checks = {i["check"] for i in built["report"]["issues"]}
    assert {"naming", "unreadable", "duplicate_id", "empty_category", "empty_instructions"} <= checks
    assert summary["issue_naming"] == 1 and summary["issue_unreadable"] == 1 and summary["issue_duplicate_id"] == 1
    naming = next(i for i in built["report"]["issues"] if i["check"] == "naming")
    assert naming["path"].endswith("wrong_name.png") and naming["category"] == "物理变化"
    assert summary["samples"] == 9 + 3  # rich, empty-instruction and twin samples count; the broken ones do not
    assert [["0001_image_101", "0203_twin"]] == built["report"]["duplicates"]


def test_each_planted_bad_edit_fails_exactly_its_check(built):
    pairs = built["report"]["pairs"]
    assert len(pairs) == built["report"]["summary"]["pairs"] > 20
    seen = set()
    for pair in pairs:
        kind = mock.bad_kind(pair["id"], pair["instruction"])
        failed = {c for c, v in pair["checks"].items() if not v["ok"]}
        if kind is None:
            assert failed == set(), (pair["pair"], failed)
        else:
            assert EXPECTED_FAIL[kind] in failed, (pair["pair"], kind, failed)
            seen.add(kind)
    assert seen == set(mock.BAD_KINDS)


def test_exports_skip_failures_and_split_by_id(built):
    out = built["root"] / "outputs" / "dataset"
    passed = [p for p in built["report"]["pairs"] if all(v["ok"] for v in p["checks"].values())]
    kontext = [json.loads(line) for line in (out / "kontext" / "instructions.jsonl").read_text("utf-8").splitlines()]
    assert len(kontext) == len(passed) == len(list((out / "kontext" / "target_images").iterdir()))
    for line in kontext:
        with Image.open(out / "kontext" / "source_images" / f"{line['stem']}.png") as source:
            assert source.size == (80, 64)  # 88x72 centre-cropped to multiples of 16
    hf_rows = []
    for split in ("train", "validation"):
        for line in (out / "hf" / split / "metadata.jsonl").read_text("utf-8").splitlines():
            row = json.loads(line)
            assert (out / "hf" / split / row["file_name"]).is_file()
            assert export_stage.split_of(row["id"], 30) == split
            hf_rows.append(row)
    assert len(hf_rows) == len(passed)
    by_id: dict[str, set] = {}
    for row in hf_rows:
        by_id.setdefault(row["id"], set()).add(export_stage.split_of(row["id"], 30))
    assert all(len(s) == 1 for s in by_id.values())


def test_huggingface_datasets_loads_the_export(built):
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(built["root"] / "outputs" / "dataset" / "hf"))
    total = sum(len(loaded[s]) for s in loaded)
    assert total == sum(1 for p in built["report"]["pairs"] if all(v["ok"] for v in p["checks"].values()))
    assert "instruction" in loaded["train"].column_names


def test_html_report_has_thumbnails_filters_and_counts(built):
    html = (built["root"] / "outputs" / "reports" / "qa" / "report.html").read_text(encoding="utf-8")
    assert 'id="category"' in html and 'id="check"' in html and "物理变化" in html
    thumbs = list((built["root"] / "outputs" / "reports" / "qa" / "thumbs").glob("*.jpg"))
    assert len(thumbs) >= 2 * len(built["report"]["pairs"])
    assert f"<b>pairs</b>: {built['report']['summary']['pairs']}" in html


def test_rerun_skips_finished_work(built):
    manifests = built["root"] / "outputs" / "manifests"
    before = {p.name: p.read_bytes() for p in manifests.glob("*.jsonl") if p.name != "qa.jsonl"}
    assert run_factory(built["config"]) == 0
    after = {p.name: p.read_bytes() for p in manifests.glob("*.jsonl") if p.name != "qa.jsonl"}
    assert before == after  # nothing redone, nothing re-exported


def test_sources_are_only_read(tmp_path):
    tree = make_tree(tmp_path, samples=4)
    before = digest_tree(tree["data"])
    modes = {}
    for path in [tree["data"], *tree["data"].rglob("*")]:
        modes[path] = path.stat().st_mode
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        assert run_factory(write_config(tmp_path, tree["data"])) == 0
        assert digest_tree(tree["data"]) == before
        assert {p: p.stat().st_mode & 0o777 for p in modes} == {
            p: (m & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) & 0o777 for p, m in modes.items()}
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@pytest.mark.parametrize("stage", ["ingest", "decompose", "generate"])
def test_resume_after_kill_in_each_stage(tmp_path, stage):
    """kill -9 while the stage's manifest grows; the rerun finishes and gives the uninterrupted result."""
    tree = make_tree(tmp_path / "a", samples=30, size=(32, 32))
    clean_cfg = write_config(tmp_path / "a", tree["data"])
    assert run_factory(clean_cfg) == 0
    (tmp_path / "b").mkdir()
    killed_cfg = write_config(tmp_path / "b", tree["data"])
    manifest = tmp_path / "b" / "outputs" / "manifests" / f"{stage}.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "client", "dataset", "--config", str(killed_cfg), "--mock"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert manifest.exists(), f"the run never reached {stage}"
    assert run_factory(killed_cfg) == 0
    a, b = tmp_path / "a" / "outputs", tmp_path / "b" / "outputs"
    assert digest_tree(a / "dataset") == digest_tree(b / "dataset")
    report_a = json.loads((a / "reports" / "qa" / "report.json").read_text("utf-8"))
    report_b = json.loads((b / "reports" / "qa" / "report.json").read_text("utf-8"))
    assert report_a["summary"] == report_b["summary"]
    assert not list(b.rglob(".editkit-partial/*")) and not list(b.glob(".dataset-*"))


def test_export_swap_recovers_after_a_kill_between_renames(tmp_path):
    (tmp_path / ".dataset-old-1").mkdir()
    (tmp_path / ".dataset-old-1" / "kept.txt").write_text("previous export")
    (tmp_path / ".dataset-building-2").mkdir()
    export_stage.recover(tmp_path)
    assert (tmp_path / "dataset" / "kept.txt").read_text() == "previous export"
    assert not list(tmp_path.glob(".dataset-*"))


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs:\n  rootz: [data]\n", encoding="utf-8")
    with pytest.raises(ClientError, match=r"unknown config key 'inputs.rootz'; allowed at inputs: roots, pattern"):
        load_config(bad)
    with pytest.raises(ClientError, match=r"--set: unknown config key 'qa.min_psnr'"):
        load_config(None, ["qa.min_psnr=20"])
    config = load_config(None, ["qa.min_psnr_outside_mask=28", "services.edit.endpoint=http://127.0.0.1:1"])
    assert config["qa"]["min_psnr_outside_mask"] == 28 and config["services"]["edit"]["endpoint"] == [
        "http://127.0.0.1:1"]
    assert load_config(ROOT / "client" / "dataset" / "example.yaml")["inputs"]["roots"] == ["client/dataset/example_data"]


def test_missing_or_empty_input_folders_stop_with_a_clear_message(tmp_path, capsys):
    assert run_factory(write_config(tmp_path, tmp_path / "nowhere")) == 1
    err = capsys.readouterr().err
    assert "input folder" in err and "nowhere" in err and "does not exist" in err
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ClientError, match="holds no pictures"):
        from client.dataset.ingest import ingest

        ingest(load_config(write_config(tmp_path, tmp_path / "empty")))


def test_server_mode_stops_early_when_no_endpoint(tmp_path, capsys):
    tree = make_tree(tmp_path, samples=2)
    config = write_config(tmp_path, tree["data"])
    assert main(["dataset", "--config", str(config)]) == 1
    assert "services.layered.endpoint is empty" in capsys.readouterr().err


def test_quality_measures_against_direct_formulas():
    rng = np.random.default_rng(0)
    a = rng.random((32, 40, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    where = np.zeros((32, 40), bool)
    where[:, :20] = True
    mse = ((a - b) ** 2).mean(-1)[where].mean()
    assert imaging.psnr(a, b, where) == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
    assert imaging.ssim(a, a) == pytest.approx(1.0)
    assert imaging.ssim(a, b) < 0.99
    assert imaging.hamming(imaging.phash(a), imaging.phash(a)) == 0
    assert imaging.hamming(imaging.phash(a), imaging.phash(rng.random((32, 40, 3)).astype(np.float32))) > 10


def test_kontext_trainer_trains_one_step_on_the_export(built, tiny_models):
    """The exported kontext/ folder is the trainer's layout as is: one optimisation step, no conversion."""
    from test_kontext_train import make_config

    from editkit.pipelines.flux.kontext_inpaint import train

    result = train.train(make_config(tiny_models / "diffusers" / "FLUX.1-Fill-dev", stage1=1, stage2=0),
                         built["root"] / "outputs" / "dataset" / "kontext", built["root"] / "train_out")
    assert len(result.losses) == 1 and np.isfinite(result.losses[0])


def _server_config(root: Path, data: Path, urls: list[str]) -> Path:
    return write_config(root, data, decompose={"enabled": False},
                        generate={"workflow": "flux_fill_inpaint", "mask": "none"},
                        services={"edit": {"endpoint": urls, "timeout": 30}, "in_flight": 1, "max_failures": 2})


def test_server_mode_survives_an_edit_server_going_away(tmp_path, fake_pair):
    """Edits run as ComfyUI prompts over two servers; one dies mid-run, the other finishes every pair once."""
    import threading

    first, second = fake_pair
    first.faults.node_seconds = second.faults.node_seconds = 0.05
    tree = make_tree(tmp_path, samples=6)
    config = _server_config(tmp_path, tree["data"], [first.url, second.url])
    comfy_manifest = tmp_path / "outputs" / "manifests" / "comfy_edit.jsonl"

    def kill_when_started():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if comfy_manifest.exists() and comfy_manifest.read_bytes().count(b"\n") >= 2:
                first.kill()
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    assert main(["dataset", "--config", str(config)]) == 0
    killer.join()
    lines = [json.loads(line) for line in (tmp_path / "outputs" / "manifests" / "generate.jsonl").read_text(
        "utf-8").splitlines()]
    done = [line["item"] for line in lines if line["status"] == "done"]
    report = json.loads((tmp_path / "outputs" / "reports" / "qa" / "report.json").read_text("utf-8"))
    assert len(done) == len(set(done)) == report["summary"]["pairs"] > 8
    servers = {json.loads(x)["server"] for x in comfy_manifest.read_text("utf-8").splitlines()
               if json.loads(x)["status"] == "done"}
    assert second.url in servers


def test_flux2_klein_inpaint_is_an_edit_stage(tmp_path, fake):
    """FLUX.2 [klein]'s inpaint workflow drops into generate.workflow with the same targets as FLUX.1-Fill's (the
    picture's alpha is the mask, the instruction goes to '2.prompt', the seed to '4.seed')."""
    tree = make_tree(tmp_path, samples=2)
    config = write_config(tmp_path, tree["data"], decompose={"enabled": False},
                          generate={"workflow": "flux2_klein_inpaint", "mask": "none"},
                          services={"edit": {"endpoint": [fake.url], "timeout": 30}, "in_flight": 1})
    assert main(["dataset", "--config", str(config)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "outputs" / "manifests" / "generate.jsonl").read_text(
        "utf-8").splitlines()]
    assert lines and all(line["status"] == "done" for line in lines)
    prompts = list(fake.prompts.values())
    assert len(prompts) == len(lines)
    assert all(p["4"]["class_type"] == "EditKitFlux2Inpaint" and p["2"]["inputs"]["prompt"] for p in prompts)
    assert len({p["4"]["inputs"]["seed"] for p in prompts}) > 1  # instruction k of a sample uses seed + k


def test_server_mode_stops_early_when_a_server_lacks_a_model(tmp_path, fake, object_info):
    spec = fake.object_info["EditKitFluxLoader"]["input"]["required"]["diffusers_folder"]
    spec[0] = [c for c in spec[0] if c != "FLUX.1-Fill-dev"]
    tree = make_tree(tmp_path, samples=2)
    with pytest.raises(ClientError, match=r"(?s)services.edit is not ready:.*diffusers_folder.*FLUX.1-Fill-dev. is not one of"):
        from client.dataset.stages import Factory

        Factory(load_config(_server_config(tmp_path, tree["data"], [fake.url])), mock_mode=False).run(
            ["generate"])
    assert not (tmp_path / "outputs" / "manifests" / "generate.jsonl").exists()


def test_server_mode_refuses_targets_that_do_not_fit_the_workflow(tmp_path, fake):
    tree = make_tree(tmp_path, samples=2)
    config = load_config(_server_config(tmp_path, tree["data"], [fake.url]), ["generate.targets.instruction=9.text"])
    from client.dataset.stages import Factory

    with pytest.raises(ClientError, match=r"generate.targets/overrides do not fit the workflow 'flux_fill_inpaint'"):
        Factory(config, mock_mode=False).run(["generate"])


# -- issue 18: defaults that run, malformed files, the edit's mask rule, empty splits, exactly once --------------

def test_defaults_are_example_yaml_and_the_default_workflow_is_bundled():
    """example.yaml says it shows every key with its default: the code's defaults are exactly it, and the default
    edit workflow is bundled with targets that fit it."""
    from client.dataset.config import DEFAULTS
    from client.workflow import apply_overrides, bundled_names, load_workflow, split_target

    assert load_config(None) == load_config(ROOT / "client" / "dataset" / "example.yaml")
    assert yaml.safe_load((ROOT / "client" / "dataset" / "example.yaml").read_text("utf-8")) == DEFAULTS
    for section in ("decompose", "generate"):
        settings = DEFAULTS[section]
        assert settings["workflow"] in bundled_names()
        targets = [(*split_target(t), 1) for name, t in settings["targets"].items() if t and name != "image"]
        apply_overrides(load_workflow(settings["workflow"]), targets)


def test_documented_first_command_runs_from_the_repository_root(tmp_path):
    """docs/dataset.md's first command, word for word, from a folder laid out like the repository root: the
    shipped example tree goes through every stage in mock mode."""
    from test_client_install import FIRST_DATASET_COMMAND, repository_like

    assert "python -m client dataset --config client/dataset/example.yaml --mock" in (
        ROOT / "docs" / "dataset.md").read_text("utf-8")
    work = repository_like(tmp_path)
    done = subprocess.run([sys.executable, "-m", "client", *FIRST_DATASET_COMMAND], cwd=work, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    report = json.loads((work / "outputs" / "reports" / "qa" / "report.json").read_text("utf-8"))
    assert report["summary"]["samples"] == 6 and report["summary"]["pairs"] >= 6
    assert report["issues"] == []


def test_malformed_instruction_files_become_qa_entries(tmp_path):
    """Issue 18, item 6: an invalid .json, a Latin-1 .txt and a .json of the wrong shape are QA entries naming the
    file and the fix; the run finishes and the other samples get their pairs."""
    tree = make_tree(tmp_path, samples=3)
    data = tree["data"]
    broken = {"0300_json": ("json", b'["make it red", '), "0301_latin": ("txt", "rendre la façade rouge\n".encode("latin-1")),
              "0302_shape": ("json", b'{"instructions": "make it red"}')}
    for sample_id, (ext, content) in broken.items():
        folder = data / "物体一致性" / sample_id
        folder.mkdir(parents=True)
        _picture(300 + len(sample_id), 40, 40).save(folder / f"{sample_id}.png")
        (folder / f"{sample_id}.{ext}").write_bytes(content)
    assert run_factory(write_config(tmp_path, data)) == 0
    report = json.loads((tmp_path / "outputs" / "reports" / "qa" / "report.json").read_text("utf-8"))
    bad = {Path(i["path"]).stem: i["message"] for i in report["issues"] if i["check"] == "bad_instructions"}
    assert set(bad) == set(broken)
    assert "not valid JSON (line 1" in bad["0300_json"] and "not UTF-8 text" in bad["0301_latin"]
    assert "save the file as UTF-8" in bad["0301_latin"] and "expected a list of strings" in bad["0302_shape"]
    assert not any(p["id"] in broken for p in report["pairs"]) and report["summary"]["pairs"] > 0
    assert not any(i["check"] == "empty_instructions" and i["id"] in broken for i in report["issues"])


def test_qa_mask_rule_is_the_edits_on_a_soft_alpha_layer():
    """Issue 18, item 7: FLUX.1-Fill repaints wherever the mask is above 0 and blends with the soft mask. An edit
    that did exactly that on a layer with soft alpha (a feathered edge and a half-transparent region) passes the
    outside-the-mask check; one that also changed pixels with mask 0 fails it."""
    from client.dataset import qa

    source = np.asarray(_picture(7, 64, 64), dtype=np.float32) / 255.0
    mask = np.zeros((64, 64), np.float32)
    mask[8:40, 8:40] = 1.0
    ramp = np.linspace(1.0, 0.0, 12, dtype=np.float32)
    mask[8:40, 40:52] = ramp  # a feathered edge
    mask[44:60, 4:60] = 0.4   # a half-transparent part of the layer
    generated = np.roll(source, 1, axis=-1) * 0.8 + 0.1
    kept_to_mask = source * (1 - mask[..., None]) + generated * mask[..., None]
    thresholds = load_config(None)["qa"]
    checks = qa.check_pair(source, kept_to_mask, mask, thresholds)
    assert all(c["ok"] for c in checks.values()), checks
    leaked = kept_to_mask.copy()
    leaked[60:, :] = generated[60:, :]  # rows the mask does not touch at all
    checks = qa.check_pair(source, leaked, mask, thresholds)
    assert not checks["outside_mask"]["ok"] and checks["outside_mask"]["psnr"] < 30
    assert qa.check_pair(source, source.copy(), mask, thresholds)["near_copy"]["ok"] is False


def test_an_empty_split_still_writes_its_metadata(tmp_path):
    tree = make_tree(tmp_path, samples=3)
    config = write_config(tmp_path, tree["data"], export={"validation_percent": 0})
    assert run_factory(config) == 0
    hf = tmp_path / "outputs" / "dataset" / "hf"
    assert (hf / "validation" / "metadata.jsonl").read_text("utf-8") == ""
    assert (hf / "train" / "metadata.jsonl").read_text("utf-8").count("\n") > 0


# The factory in a subprocess that dies (os._exit) at the N-th append to one stage's manifest, i.e. after that
# item's files are written and before its line is: the rerun must not leave a second copy or an unlisted file.
DATASET_KILLER = """
import os, sys
stage, n = sys.argv[1], int(sys.argv[2]); calls = [0]
import client.manifest as manifest
original = manifest.Manifest.append
def append(self, record):
    if self.path.name == stage + ".jsonl":
        calls[0] += 1
        if calls[0] == n:
            os._exit(9)
    original(self, record)
manifest.Manifest.append = append
from client.__main__ import main
sys.exit(main(sys.argv[3:]))
"""


def staging_files(out: Path, stage: str) -> list[str]:
    return sorted(os.path.abspath(p) for p in (out / "staging" / stage).rglob("*") if p.is_file())


def listed_files(out: Path, stage: str) -> list[str]:
    records = [r for r in (json.loads(line) for line in (out / "manifests" / f"{stage}.jsonl").read_text(
        "utf-8").splitlines()) if r["status"] == "done"]
    last = {r["item"]: r for r in records}
    if stage == "decompose":
        files = [f for r in last.values() for layer in r["layers"] for f in layer.values()]
    else:
        files = [f for r in last.values() for f in (r["edit"], r["mask"]) if f]
    return sorted(os.path.abspath(f) for f in files)


@pytest.mark.parametrize("stage", ["decompose", "generate"])
def test_kill_between_writing_and_recording_in_a_stage_leaves_each_output_once(tmp_path, stage):
    tree = make_tree(tmp_path / "a", samples=6, size=(32, 32))
    clean = write_config(tmp_path / "a", tree["data"])
    assert run_factory(clean) == 0
    (tmp_path / "b").mkdir()
    killed_cfg = write_config(tmp_path / "b", tree["data"])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = subprocess.run([sys.executable, "-c", DATASET_KILLER, stage, "4", "dataset", "--config", str(killed_cfg),
                             "--mock"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr
    assert run_factory(killed_cfg) == 0
    a, b = tmp_path / "a" / "outputs", tmp_path / "b" / "outputs"
    assert digest_tree(a / "dataset") == digest_tree(b / "dataset")
    for name in ("decompose", "generate"):
        assert staging_files(b, name) == listed_files(b, name)
        assert len(set(listed_files(b, name))) == len(listed_files(b, name))
    assert not [p for p in b.rglob(".*")], "a hidden folder or file stayed behind"
    assert {p.stat().st_mode & 0o777 for p in b.rglob("*") if p.is_file()} == {0o644}
