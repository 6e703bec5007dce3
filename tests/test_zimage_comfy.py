"""Z-Image inside ComfyUI's real executor: the one-node recipe equals the modular graph of samplers and native
LatentUpscale / LatentUpscaleBy, and EditKit's latent resize equals those native nodes (COMFYUI_ROOT needed).

The loader runs as shipped (ComfyUI's single files, no diffusers folder), so the tokenizer is ComfyUI's bundled
Qwen tokenizer with EditKit's Qwen3 chat format.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from editkit.pipelines.zimage.latents import upscale_raw, upscale_size
from packload import ROOT

pytestmark = pytest.mark.comfyui

API = ROOT / "workflows" / "api"
STAGES = """
sampler: euler_ancestral
shift: 3.0
progressive_stages:
  stage1: {height: 32, width: 48, num_inference_steps: 2, guidance_scale: 2.0}
  stage2: {height: 64, width: 80, num_inference_steps: 2, guidance_scale: 1.0, strength: 0.7}
  stage3: {scale_by: 2.0, num_inference_steps: 2, guidance_scale: 1.0, strength: 0.6}
"""


def _load(name: str) -> dict:
    return json.loads((API / f"{name}.json").read_text(encoding="utf-8"))


def _modular() -> dict:
    """zimage_progressive_nodes as shipped but small: the same sizes and steps as STAGES."""
    prompt = _load("zimage_progressive_nodes")
    for node_id, (width, height) in {"3": (48, 32), "4": (80, 64)}.items():
        prompt[node_id]["inputs"].update(width=width, height=height)
    for node_id in ("3", "5", "7"):
        prompt[node_id]["inputs"]["steps"] = 2
    prompt["8"]["inputs"]["vae_name"] = "flux_vae_full_width.safetensors"  # ComfyUI's VAE needs the real width
    return prompt


def _progressive() -> dict:
    prompt = _load("zimage_progressive")
    prompt["2"]["inputs"].update(stages=STAGES, seed=42, decode_stages=False)
    return prompt


def test_progressive_node_equals_the_modular_graph(comfyui):
    modular = comfyui.run(_modular())
    assert modular.success, modular.error()
    one = comfyui.run(_progressive())
    assert one.success, one.error()
    graph_latent = modular.output("7", 0)["samples"]
    node_latent = one.output("2", 1)["samples"]
    assert graph_latent.shape == (1, 16, 16, 20)
    assert torch.equal(node_latent, graph_latent)
    # The settings are what decide: another seed on stage 3 alone gives another latent.
    other = _modular()
    other["7"]["inputs"]["seed"] = 45
    changed = comfyui.run(other)
    assert changed.success and not torch.equal(changed.output("7", 0)["samples"], graph_latent)


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "bicubic", "area"])
def test_latent_resize_equals_comfyuis_latent_upscale_nodes(comfyui, method):
    raw = torch.randn(2, 16, 27, 21, generator=torch.Generator().manual_seed(3))
    native_size = comfyui.node_class("LatentUpscale")().upscale({"samples": raw}, method, 336 + 4, 432 + 4,
                                                                "disabled")[0]["samples"]
    assert torch.equal(upscale_raw(raw, 336, 432, method), native_size)  # ComfyUI floors pixels // 8 too
    native_by = comfyui.node_class("LatentUpscaleBy")().upscale({"samples": copy.deepcopy(raw)}, method, 2.0)[0]
    assert torch.equal(upscale_raw(raw, 336, 432, method), native_by["samples"])


def test_stages_below_64_pixels_are_raised_to_64_as_latent_upscale_does(comfyui):
    """A 48x48 stage after a 32x32 one: ComfyUI's LatentUpscale resizes to 64x64 (8x8 latent), so the recipe does too."""
    modular = _modular()
    modular["3"]["inputs"].update(width=32, height=32)
    modular["4"]["inputs"].update(width=48, height=48)
    graph = comfyui.run(modular)
    assert graph.success, graph.error()
    assert graph.output("5", 0)["samples"].shape == (1, 16, 8, 8)  # LatentUpscale made the 48x48 target 64x64
    progressive = _progressive()
    progressive["2"]["inputs"]["stages"] = STAGES.replace("{height: 32, width: 48,", "{height: 32, width: 32,").replace(
        "{height: 64, width: 80,", "{height: 48, width: 48,")
    one = comfyui.run(progressive)
    assert one.success, one.error()
    final = graph.output("7", 0)["samples"]
    assert final.shape == (1, 16, 16, 16)
    assert torch.equal(one.output("2", 1)["samples"], final)
    assert torch.equal(upscale_raw(graph.output("3", 0)["samples"], *upscale_size(48, 48)), graph.output("4", 0)["samples"])
