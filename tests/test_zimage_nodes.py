"""Z-Image nodes called the way ComfyUI calls them, the progressive node against the chain of samplers, and the CLI.

(The same comparison through ComfyUI's real executor, with its own LatentUpscale nodes, is in
test_zimage_comfy.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.nodes import zimage_nodes as zn
from editkit.pipelines.core.errors import EditKitError
from editkit.pipelines.zimage import cli
from editkit.pipelines.zimage.latents import upscale_raw
from node_calls import call_node
from packload import ROOT
from tiny import zimage as zm

STAGES = """
sampler: euler_ancestral
progressive_stages:
  stage1: {height: 48, width: 64, num_inference_steps: 3, guidance_scale: 2.0}
  stage2: {height: 80, width: 96, num_inference_steps: 3, guidance_scale: 1.0, strength: 0.7}
  stage3: {scale_by: 2.0, num_inference_steps: 2, guidance_scale: 1.0, strength: 0.6}
"""
PROMPT = "portrait of a sailor, golden hour"


@pytest.fixture()
def loaded(models_root, torch_runtime):
    """EditKit · Z-Image Loader on ComfyUI's single files, with the folder supplying the tokenizer."""
    return call_node(zn.EditKitZImageLoader, diffusers_folder=zm.FOLDER, transformer_file=zm.TRANSFORMER_FILE,
                     text_encoder_file=zm.TEXT_ENCODER_FILE, vae_file="ae.safetensors", weight_dtype="fp32")


def _progressive(loaded, **kw):
    model, text, vae = loaded
    settings = dict(model=model, text_encoder=text, vae=vae, prompt=PROMPT, negative_prompt="blurry", seed=7,
                    stages=STAGES)
    settings.update(kw)
    return call_node(zn.EditKitZImageProgressive, **settings)


def _modular(loaded, seed=7):
    """The zimage_progressive_nodes graph: three samplers, LatentUpscale to a size, LatentUpscaleBy 2x."""
    model, text, vae = loaded
    positive, negative = call_node(zn.EditKitZImageTextEncode, text_encoder=text, prompt=PROMPT,
                                   negative_prompt="blurry")
    common = dict(model=model, vae=vae, positive=positive, negative=negative, sampler="euler_ancestral",
                  decode=False)
    first, _ = call_node(zn.EditKitZImageSampler, **common, width=64, height=48, seed=seed, steps=3, cfg=2.0)
    resized = {"samples": upscale_raw(first["samples"], 96, 80)}
    second, _ = call_node(zn.EditKitZImageSampler, **common, latent=resized, seed=seed + 1, steps=3, cfg=1.0,
                          denoise=0.7)
    doubled = {"samples": upscale_raw(second["samples"], 192, 160)}
    third, image = call_node(zn.EditKitZImageSampler, **{**common, "decode": True}, latent=doubled, seed=seed + 2,
                             steps=2, cfg=1.0, denoise=0.6)
    return third, image


def test_progressive_node_equals_the_chain_of_sampler_nodes(loaded):
    image, latent, stages = _progressive(loaded)
    third, modular_image = _modular(loaded)
    assert latent["samples"].shape == (1, 16, 20, 24)
    assert torch.equal(latent["samples"], third["samples"])
    assert torch.equal(image, modular_image)
    assert image.shape == (1, 160, 192, 3)
    assert stages.shape == (3, 160, 192, 3) and torch.equal(stages[2], image[0])
    assert not torch.equal(stages[0], stages[2])


def test_progressive_batch(loaded):
    image, latent, stages = _progressive(loaded, batch_size=2, decode_stages=False)
    assert latent["samples"].shape == (2, 16, 20, 24) and image.shape == (2, 160, 192, 3)
    assert not torch.equal(latent["samples"][0], latent["samples"][1])  # each picture its own noise
    assert torch.equal(stages, image)  # without stage decoding the 'stages' output is the final picture


def test_single_stage_is_text_to_image_of_the_sampler(loaded):
    model, text, vae = loaded
    one = "progressive_stages:\n  stage1: {height: 64, width: 80, num_inference_steps: 3, guidance_scale: 1.0}\n"
    _, latent, stages = _progressive(loaded, stages=one, negative_prompt="")
    positive, _ = call_node(zn.EditKitZImageTextEncode, text_encoder=text, prompt=PROMPT, negative_prompt="")
    reference, _ = call_node(zn.EditKitZImageSampler, model=model, vae=vae, positive=positive, width=80, height=64,
                             seed=7, steps=3, sampler="euler_ancestral", decode=False)
    assert torch.equal(latent["samples"], reference["samples"]) and stages.shape[0] == 1


def test_sampler_node_decode_switch_and_input_checks(loaded):
    model, text, vae = loaded
    positive, negative = call_node(zn.EditKitZImageTextEncode, text_encoder=text, prompt=PROMPT)
    common = dict(model=model, vae=vae, positive=positive, width=64, height=64, steps=2)
    latent, image = call_node(zn.EditKitZImageSampler, **common, decode=False)
    assert image is None and latent["samples"].shape == (1, 16, 8, 8)
    # a connected image output with decode off (ComfyUI passes the prompt and the node id as hidden inputs)
    graph = {"5": {"class_type": "EditKitZImageSampler", "inputs": {}},
             "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 1]}}}
    with pytest.raises(EditKitError, match="'image' output is connected but 'decode' is off"):
        call_node(zn.EditKitZImageSampler, **common, decode=False, prompt=graph, unique_id="5")
    with pytest.raises(EditKitError, match="cfg is 2.0 but no negative CONDITIONING"):
        call_node(zn.EditKitZImageSampler, **common, cfg=2.0)
    with pytest.raises(EditKitError, match="nearest valid size is 64x80"):
        call_node(zn.EditKitZImageSampler, **{**common, "height": 72})
    flux = [[torch.zeros(1, 8, 4096), {"pooled_output": torch.zeros(1, 768)}]]
    with pytest.raises(EditKitError, match="FLUX.1's T5-XXL"):
        call_node(zn.EditKitZImageSampler, **{**common, "positive": flux})
    with pytest.raises(EditKitError, match="Unknown sampler 'dpmpp'"):
        call_node(zn.EditKitZImageSampler, **common, sampler="dpmpp")
    with pytest.raises(EditKitError, match="The prompt is empty"):
        call_node(zn.EditKitZImageTextEncode, text_encoder=text, prompt="  ")


def test_progressive_checks_every_stage_before_loading(models_root, torch_runtime):
    model, text, vae = call_node(zn.EditKitZImageLoader, diffusers_folder=zm.FOLDER, weight_dtype="fp32")
    bad = STAGES.replace("height: 80, width: 96", "height: 80, width: 100")
    with pytest.raises(EditKitError, match="stage2: width 100 .* nearest valid width is 96"):
        _progressive((model, text, vae), stages=bad)
    assert "not loaded yet" in repr(model.transformer) and "not loaded yet" in repr(text)


# --------------------------------------------------------------------------------------------------------------
# The standalone CLI


def _cli_args(tiny_models, tmp_path):
    config = tmp_path / "stages.yaml"
    config.write_text(STAGES, encoding="utf-8")
    return ["--models-dir", str(tiny_models), "--config", str(config), "--diffusers-folder", zm.FOLDER,
            "--transformer", zm.TRANSFORMER_FILE, "--text-encoder", zm.TEXT_ENCODER_FILE, "--vae", "ae.safetensors",
            "--dtype", "fp32", "--device", "cpu", "--negative-prompt", "blurry"]


def test_cli_makes_the_same_picture_as_the_node(loaded, tiny_models, tmp_path, capsys):
    out = tmp_path / "sailor.png"
    assert cli.main(_cli_args(tiny_models, tmp_path) + ["--prompt", PROMPT, "--seed", "7", "--out", str(out)]) == 0
    assert "step" in capsys.readouterr().err  # the progress bar
    image = _progressive(loaded, decode_stages=False)[0]
    expected = np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8)  # SaveImage's rounding
    with Image.open(out) as picture:
        assert np.array_equal(np.asarray(picture), expected)
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_python_m_pipelines_from_the_repository_root(tiny_models, tmp_path):
    """``python -m pipelines zimage`` as a user runs it (a fresh process: the pack is not imported)."""
    out = tmp_path / "one.png"
    one = "progressive_stages:\n  stage1: {height: 32, width: 48, num_inference_steps: 1}\n"
    (tmp_path / "one.yaml").write_text(one, encoding="utf-8")
    args = _cli_args(tiny_models, tmp_path)
    args[args.index("--config") + 1] = str(tmp_path / "one.yaml")
    done = subprocess.run([sys.executable, "-m", "pipelines", "zimage", *args, "--prompt", PROMPT, "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "editkit" not in done.stderr.lower() or "error" not in done.stderr.lower()
    with Image.open(out) as picture:
        assert picture.size == (48, 32)


def test_cli_batch_reports_a_bad_line_and_goes_on_or_stops(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "tweets.jsonl"
    prompts.write_text('{"prompt": "a lighthouse", "name": "light"}\n{"prompt": ""}\n'
                       '{"prompt": "a harbour", "seed": 3}\nnot json\n', encoding="utf-8")
    args = _cli_args(tiny_models, tmp_path) + ["--prompts", str(prompts), "--quiet"]
    assert cli.main(args + ["--out", str(tmp_path / "stop"), "--on-bad-line", "stop"]) == 2
    err = capsys.readouterr().err
    assert "line 2: no prompt" in err and "line 4: not valid JSON" in err and "nothing generated" in err
    assert not (tmp_path / "stop").exists()
    assert cli.main(args + ["--out", str(tmp_path / "skip")]) == 0
    err = capsys.readouterr().err
    assert "line 2: no prompt" in err and "done: 2 picture(s), skipped 2 bad line(s)" in err
    assert sorted(p.name for p in (tmp_path / "skip").iterdir()) == ["0002.png", "light.png"]
    with Image.open(tmp_path / "skip" / "light.png") as picture:
        assert picture.size == (192, 160)


def test_cli_empty_prompt_file_and_missing_models(tiny_models, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n", encoding="utf-8")
    args = _cli_args(tiny_models, tmp_path)
    assert cli.main(args + ["--prompts", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "holds no prompts" in capsys.readouterr().err
    assert cli.main(["--models-dir", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 1
    assert "No transformer, text encoder, VAE" in capsys.readouterr().err
