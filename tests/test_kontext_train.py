"""The two-stage Kontext-inpaint fine-tune on the tiny models: stages, loss, resume, checkpoints, errors."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

from editkit.pipelines.core.errors import EditKitError
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux.kontext_inpaint import checkpoint as ckpt
from editkit.pipelines.flux.kontext_inpaint import config as train_config
from editkit.pipelines.flux.kontext_inpaint import dataset, train
from editkit.pipelines.flux.kontext_inpaint.widen import widen_fill_transformer
from editkit.pipelines.flux.loading import transformer_source

ROOT = Path(__file__).resolve().parents[1]
SEED_YAML = """
model:
  arch: flux_fill_inpaint
  name_or_path: {path}
  model_kwargs:
    kontext_inpaint_mode: true
    two_stage_training: true
    stage1_steps: 1000
    stage1_lr: 1e-4
    stage2_lr: 5e-5
"""


def _picture(rng, height, width, mode="RGB") -> Image.Image:
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def write_dataset(root: Path, sizes=((64, 64), (64, 64), (96, 64)), masks=(0,), seed=0) -> Path:
    """Pairs p0, p1, ... of the given (height, width); a target is its source with a bright square."""
    rng = np.random.default_rng(seed)
    for sub in ("source_images", "target_images", "instructions", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        source = _picture(rng, h, w)
        target = np.array(source)
        target[8:40, 8:40] = (255, 220, 0)
        source.save(root / "source_images" / f"p{i}.png")
        Image.fromarray(target).save(root / "target_images" / f"p{i}.png")
        (root / "instructions" / f"p{i}.txt").write_text(f"paint a yellow square {i}\n", encoding="utf-8")
        if i in masks:
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[:48, :48] = 255
            Image.fromarray(mask, "L").save(root / "masks" / f"p{i}.png")
    return root


def make_config(fill_folder: Path, stage1=2, stage2=2, **train_settings) -> train_config.TrainingConfig:
    settings = {"max_sequence_length": 8, "log_every": 1, "save_every": 0, **train_settings}
    return train_config.parse_config({
        "model": {"arch": "flux_fill_inpaint", "name_or_path": str(fill_folder),
                  "model_kwargs": {"stage1_steps": stage1, "stage2_steps": stage2}},
        "train": settings,
    })


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fill_folder(tiny_models) -> Path:
    return tiny_models / "diffusers" / "FLUX.1-Fill-dev"


@pytest.fixture(scope="module")
def straight_run(fill_folder, tmp_path_factory):
    """2 steps of stage 1 + 2 of stage 2 in one go: the reference for the other tests."""
    root = tmp_path_factory.mktemp("straight")
    data = write_dataset(root / "data")
    before = tree_digest(data)
    result = train.train(make_config(fill_folder), data, root / "out")
    assert tree_digest(data) == before, "training modified the dataset folder"
    return result


# --------------------------------------------------------------------------------------
# Config


def test_seed_yaml_keys_parse(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_YAML.format(path="/models/FLUX.1-Fill-dev"), encoding="utf-8")
    config = train_config.load_config(path)
    kwargs = config.model.model_kwargs
    assert config.model.arch == "flux_fill_inpaint"
    assert config.model.name_or_path == "/models/FLUX.1-Fill-dev"
    assert (kwargs.kontext_inpaint_mode, kwargs.two_stage_training) == (True, True)
    assert (kwargs.stage1_steps, kwargs.stage1_lr, kwargs.stage2_lr) == (1000, 1e-4, 5e-5)
    assert kwargs.stage2_steps == 2000  # the spec's default for the key the seed leaves out
    stages = train_config.plan_stages(kwargs)
    assert [(s.number, s.start, s.end, s.lr) for s in stages] == [(1, 0, 1000, 1e-4), (2, 1000, 3000, 5e-5)]


def test_example_config_parses_with_overrides():
    example = ROOT / "workflows" / "training" / "kontext_inpaint_example.yaml"
    raw = yaml.safe_load(example.read_text(encoding="utf-8"))
    assert set(raw["model"]["model_kwargs"]) >= {"kontext_inpaint_mode", "two_stage_training", "stage1_steps",
                                                 "stage1_lr", "stage2_lr"}
    config = train_config.load_config(example, ["train.optimizer=adafactor", "model.model_kwargs.stage1_steps=10"])
    assert config.train.optimizer == "adafactor"
    assert config.model.model_kwargs.stage1_steps == 10
    assert config.train == train_config.TrainSettings(optimizer="adafactor")  # the example shows every default


@pytest.mark.parametrize("values, named", [
    ({"model": {"name_or_path": "x", "model_kwargs": {"stage1_step": 5}}}, "model.model_kwargs.stage1_step"),
    ({"model": {"name_or_path": "x"}, "trian": {}}, "'trian'"),
    ({"model": {"name_or_path": "x"}, "train": {"batch_size": "two"}}, "train.batch_size"),
    ({"model": {"name_or_path": "x", "arch": "flux_dev"}}, "model.arch"),
    ({"model": {"name_or_path": "x"}, "train": {"mixed_precision": False}}, "Quote it"),
    ({"model": {"name_or_path": "x"}, "train": {"optimizer": "adamw8bit"}}, "bitsandbytes"),
])
def test_bad_config_is_named(values, named):
    if named == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(EditKitError, match=named.replace(".", r"\.")):
        train_config.parse_config(values)


# --------------------------------------------------------------------------------------
# Stages, loss, checkpoints


def test_stage1_trains_only_x_embedder_and_stage2_trains_everything(straight_run, fill_folder):
    first, second = straight_run.checkpoints
    assert (first.name, second.name) == ("checkpoint-000002", "checkpoint-000004")
    fill = FluxTransformer2DModel.from_pretrained(str(fill_folder / "transformer"), torch_dtype=torch.float32)
    start = widen_fill_transformer(fill).state_dict()
    after1, after2 = weights(first), weights(second)
    assert set(after1) == set(start)
    changed1 = {k for k in start if not torch.equal(start[k], after1[k])}
    assert changed1 == {"x_embedder.weight", "x_embedder.bias"}
    unchanged2 = [k for k in after1 if k not in changed1 and torch.equal(after1[k], after2[k])]
    assert unchanged2 == [], f"stage 2 left these parameters unchanged: {unchanged2}"
    assert all(np.isfinite(straight_run.losses))


def test_checkpoint_loads_through_flux_loading(straight_run):
    final = straight_run.checkpoints[-1]
    trained = weights(final)
    state = ckpt.read_state(final)
    assert (state.global_step, state.stage) == (4, 2)
    from_file = transformer_source(None, final / state.bfl_file, torch.float32).get().module
    from_folder = transformer_source(final, None, torch.float32).get().module
    for model in (from_file, from_folder):
        assert model.config.in_channels == 192
        assert model.x_embedder.weight.shape[1] == 192
        loaded = model.state_dict()
        assert set(loaded) == set(trained)
        assert all(torch.equal(loaded[k], trained[k]) for k in trained)


def test_loss_falls_on_an_overfit_set(fill_folder, tmp_path):
    data = write_dataset(tmp_path / "data", sizes=((64, 64), (64, 64)))
    config = make_config(fill_folder, stage1=0, stage2=24, log_every=100)
    config.model.model_kwargs.two_stage_training = False
    config.model.model_kwargs.stage2_lr = 1e-3
    config.train.batch_size = 2
    losses = train.train(config, data, tmp_path / "out").losses
    assert len(losses) == 24
    early, late = np.mean(losses[:5]), np.mean(losses[-5:])
    assert late < 0.75 * early, f"loss did not fall: first steps {losses[:5]}, last steps {losses[-5:]}"


@pytest.mark.parametrize("stop_at", [1, 3], ids=["stopped-in-stage-1", "stopped-in-stage-2"])
def test_resume_reproduces_an_uninterrupted_run(straight_run, fill_folder, tmp_path, stop_at):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    first = train.train(make_config(fill_folder), data, out, stop_at_step=stop_at)
    assert first.global_step == stop_at
    assert [p.name for p in ckpt.list_checkpoints(out)][-1] == f"checkpoint-{stop_at:06d}"
    second = train.train(make_config(fill_folder), data, out, resume="latest")
    assert second.global_step == 4
    assert first.losses + second.losses == straight_run.losses
    expected, got = weights(straight_run.checkpoints[-1]), weights(second.checkpoints[-1])
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_fresh_run_refuses_an_output_with_checkpoints(straight_run, fill_folder):
    out = straight_run.checkpoints[-1].parent
    with pytest.raises(EditKitError, match="--resume latest"):
        train.train(make_config(fill_folder), out.parent / "data", out)


def test_failed_save_leaves_no_checkpoint(fill_folder, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", sizes=((64, 64),))
    out = tmp_path / "out"

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "write_bfl_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        train.train(make_config(fill_folder, stage1=1, stage2=0), data, out)
    assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == []


def test_cache_is_reused_and_follows_changes(fill_folder, tmp_path):
    data = write_dataset(tmp_path / "data", sizes=((64, 64), (64, 64)))
    sources = train.resolve_sources(make_config(fill_folder), torch.float32)
    runtime = TorchRuntime("cpu")
    pairs = dataset.scan_dataset(data)
    paths = dataset.build_cache(pairs, tmp_path / "cache", sources.encoders, runtime)
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert dataset.build_cache(pairs, tmp_path / "cache", sources.encoders, runtime) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    (data / "instructions" / "p1.txt").write_text("a different edit", encoding="utf-8")
    pairs = dataset.scan_dataset(data)
    dataset.build_cache(pairs, tmp_path / "cache", sources.encoders, runtime)
    assert paths[0].stat().st_mtime_ns == stamps[0] and paths[1].stat().st_mtime_ns != stamps[1]
    entry = load_file(str(paths[0]))
    assert entry["source"].shape == (16, 8, 8) and entry["mask"].shape == (16, 8, 8)
    assert entry["text"].shape[0] == 8 and entry["pooled"].ndim == 1


def test_single_file_sources(tiny_models):
    """A ComfyUI user's files: BFL transformer + ae + clip_l + t5, tokenizers from a diffusers folder."""
    tokenizers = tiny_models / "diffusers" / "FLUX.1-Fill-dev"
    values = {"model": {
        "name_or_path": str(tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors"),
        "vae_file": str(tiny_models / "vae" / "ae.safetensors"),
        "clip_file": str(tiny_models / "text_encoders" / "clip_l.safetensors"),
        "clip_tokenizer_dir": str(tokenizers / "tokenizer"),
        "t5_tokenizer_dir": str(tokenizers / "tokenizer_2"),
    }}
    with pytest.raises(EditKitError, match="No source for the text encoder 2.*model.t5_file"):
        train.resolve_sources(train_config.parse_config(values), torch.float32)
    values["model"]["t5_file"] = str(tiny_models / "text_encoders" / "t5xxl_fp16.safetensors")
    sources = train.resolve_sources(train_config.parse_config(values), torch.float32)
    model = train.load_trainable_transformer(sources.transformer)
    assert model.config.in_channels == 192
    states, pooled = sources.encoders.text.get().encode(["make it night"], TorchRuntime("cpu"), 8)
    assert states.shape[:2] == (1, 8) and pooled.shape[0] == 1


# --------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written


def _break_size(data):
    _picture(np.random.default_rng(1), 64, 72).save(data / "target_images" / "p1.png")


def _break_mask(data):
    Image.new("L", (64, 48), 255).save(data / "masks" / "p0.png")


def _drop_target(data):
    (data / "target_images" / "p2.png").unlink()


def _corrupt_image(data):
    (data / "source_images" / "p1.png").write_bytes(b"not a png at all")


def _drop_instruction(data):
    (data / "instructions" / "p2.txt").unlink()


@pytest.mark.parametrize("damage, message", [
    (_break_size, r"target_images/p1\.png' is 72x64.*multiples of 16"),
    (_break_mask, r"masks/p0\.png' is 64x48 but its source .* resize the mask to 64x64"),
    (_drop_target, r"Pair 'p2' has no target"),
    (_corrupt_image, r"Cannot read the image '.*source_images/p1\.png'"),
    (_drop_instruction, r"Pair 'p2' has no instruction"),
], ids=["odd-size", "mask-size", "missing-target", "unreadable", "no-instruction"])
def test_bad_dataset_gives_a_clear_error_and_writes_nothing(fill_folder, tmp_path, damage, message):
    data = write_dataset(tmp_path / "data")
    damage(data)
    out = tmp_path / "out"
    with pytest.raises(EditKitError, match=message):
        train.train(make_config(fill_folder), data, out)
    assert not out.exists()


def test_cli_reports_errors_in_one_line(fill_folder, tmp_path, capsys):
    script = ROOT / "scripts" / "train_kontext_inpaint.py"
    config = tmp_path / "cfg.yaml"
    config.write_text(SEED_YAML.format(path=fill_folder) + "  typo_key: 1\n", encoding="utf-8")
    data = write_dataset(tmp_path / "data", sizes=((64, 64),))
    result = subprocess.run([sys.executable, str(script), "--config", str(config), "--data", str(data),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Unknown config key 'model.typo_key'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_trains_with_bf16_checkpointing_and_adafactor(fill_folder, tmp_path):
    """Runs in a subprocess: accelerate's mixed-precision state is per process."""
    script = ROOT / "scripts" / "train_kontext_inpaint.py"
    config = tmp_path / "cfg.yaml"
    config.write_text(SEED_YAML.format(path=fill_folder), encoding="utf-8")
    data = write_dataset(tmp_path / "data", sizes=((64, 64),))
    out = tmp_path / "out"
    settings = ["model.model_kwargs.stage1_steps=1", "model.model_kwargs.stage2_steps=1", "train.log_every=1",
                "train.max_sequence_length=8", "train.mixed_precision=bf16", "train.gradient_checkpointing=true",
                "train.optimizer=adafactor", "train.weights_dtype=bfloat16", "train.export_dtype=bfloat16"]
    command = [sys.executable, str(script), "--config", str(config), "--data", str(data), "--output", str(out)]
    for setting in settings:
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 1/2  stage 1  loss" in result.stdout and "step 2/2  stage 2  loss" in result.stdout
    final = out / "checkpoint-000002"
    bfl = load_file(str(final / ckpt.bfl_file_name(2)))
    assert bfl["img_in.weight"].dtype == torch.bfloat16 and bfl["img_in.weight"].shape[1] == 192
    assert (out / train_config.LOG_FILE).is_file()


@pytest.mark.slow
def test_two_process_run_resumes_exactly(fill_folder, tmp_path):
    """Two processes (DDP over gloo on the CPU, launched like accelerate launch does): straight == split + resume."""
    script = ROOT / "scripts" / "train_kontext_inpaint.py"
    config = tmp_path / "cfg.yaml"
    config.write_text(SEED_YAML.format(path=fill_folder).replace("stage1_steps: 1000", "stage1_steps: 2")
                      + "    stage2_steps: 2\ntrain:\n  max_sequence_length: 8\n  save_every: 0\n", encoding="utf-8")
    data = write_dataset(tmp_path / "data")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}

    def launch(out: Path, *extra: str) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                   "--config", str(config), "--data", str(data), "--output", str(out), *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    launch(tmp_path / "straight")
    launch(tmp_path / "split", "--stop-at-step", "1")
    launch(tmp_path / "split", "--resume", "latest")
    state = tmp_path / "split" / "checkpoint-000004" / "training_state"
    assert {p.name for p in state.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    expected = weights(tmp_path / "straight" / "checkpoint-000004")
    got = weights(tmp_path / "split" / "checkpoint-000004")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
