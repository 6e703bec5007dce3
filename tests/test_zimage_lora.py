"""Z-Image LoRA on the shared mechanism: each published key layout against weights merged independently.

The reference merges ``W + strength * alpha / r * B @ A`` into the base transformer's weights: for LoRAs in
the original (ComfyUI) layout in that key space, on the fused ``attention.qkv``, then converted to diffusers
with diffusers' own checkpoint converter, which shares nothing with the LoRA code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from editkit.nodes import zimage_nodes as zn
from editkit.pipelines.core import sampling as core
from editkit.pipelines.core.errors import ModelFileError
from editkit.pipelines.core.lora import add_lora
from editkit.pipelines.core.runtime import Component, TorchRuntime
from editkit.pipelines.zimage import loading, sampler
from editkit.pipelines.zimage.family import FAMILY
from editkit.pipelines.zimage.lora import ZIMAGE_LORA
from node_calls import call_node
from tiny import zimage as zm

F32 = torch.float32
RANK = 4
ALPHA = 2.0
# Original-layout modules (as in ComfyUI's checkpoint) a LoRA targets.
ORIGINAL_TARGETS = ["layers.0.attention.qkv", "layers.1.attention.out", "layers.0.feed_forward.w2",
                    "noise_refiner.0.adaLN_modulation.0", "context_refiner.0.feed_forward.w1", "final_layer.linear"]
DIFFUSERS_TARGETS = ["layers.0.attention.to_q", "layers.0.attention.to_v", "layers.1.attention.to_out.0",
                     "layers.1.feed_forward.w3", "noise_refiner.0.attention.to_k"]


@pytest.fixture(scope="module")
def base(tiny_models) -> Component:
    return loading.transformer_source(tiny_models / "diffusers" / zm.FOLDER, None, F32).get()


def _pairs(shapes: dict[str, tuple[int, int]], seed=3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(RANK, i, generator=g) * 0.1, torch.randn(o, RANK, generator=g) * 0.1)
            for name, (o, i) in shapes.items()}


def _original_shapes(base) -> dict[str, tuple[int, int]]:
    comfy = zm.diffusers_to_comfy(base.module.state_dict())
    return {t: tuple(comfy[f"{zm.COMFY_PREFIX}{t}.weight"].shape) for t in ORIGINAL_TARGETS}


def _merged_original(base, pairs, strength) -> torch.nn.Module:
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    comfy = {k: v.double() for k, v in zm.diffusers_to_comfy(base.module.state_dict()).items()}
    for name, (down, up) in pairs.items():
        comfy[f"{zm.COMFY_PREFIX}{name}.weight"] += strength * ALPHA / RANK * (up.double() @ down.double())
    model = copy.deepcopy(base.module)
    model.load_state_dict({k: v.float() for k, v in convert_z_image_transformer_checkpoint_to_diffusers(comfy).items()})
    return model


def _merged_diffusers(base, pairs, strength, scale) -> torch.nn.Module:
    model = copy.deepcopy(base.module)
    sd = model.state_dict()
    for name, (down, up) in pairs.items():
        sd[f"{name}.weight"] = (sd[f"{name}.weight"].double() + strength * scale * (up.double() @ down.double())).float()
    model.load_state_dict(sd)
    return model


def _write(path, tensors: dict, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _run(component, seed=9):
    captions = [torch.randn(6, 16, generator=torch.Generator().manual_seed(1))]
    noise = core.seeded_noise((1, 16, 8, 8), seed)
    schedule = sampler.zimage_schedule(FAMILY.scheduler_config(None), 2)
    return sampler.sample(component, captions, noise, schedule, TorchRuntime("cpu"))


def _lora_component(base, path, strength):
    model = loading.ZImageModel(type("Handle", (), {"get": lambda self: base, "key": ("base",)})(), {})
    return add_lora(model, ZIMAGE_LORA, path, strength).transformer.get()


@pytest.mark.parametrize("layout", ["comfyui", "comfyui_peft_names", "kohya"])
def test_original_layout_loras_equal_merged_weights(base, tmp_path, layout):
    pairs = _pairs(_original_shapes(base))
    tensors = {}
    for name, (down, up) in pairs.items():
        if layout == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
        else:
            stem = f"diffusion_model.{name}"
        a, b = (".lora_A.weight", ".lora_B.weight") if layout == "comfyui_peft_names" else (".lora_down.weight",
                                                                                               ".lora_up.weight")
        tensors[stem + a], tensors[stem + b], tensors[stem + ".alpha"] = down, up, torch.tensor(ALPHA)
    path = _write(tmp_path / f"{layout}.safetensors", tensors)
    ours = _run(_lora_component(base, path, 0.8))
    reference = _run(Component(_merged_original(base, pairs, 0.8), "diffusion", "ref", F32))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert (ours - _run(base)).abs().max() > 1e-3  # the LoRA does change the picture


def test_diffusers_peft_lora_equals_merged_weights_and_leaves_the_base_unchanged(base, tmp_path):
    shapes = {t: tuple(base.module.get_submodule(t).weight.shape) for t in DIFFUSERS_TARGETS}
    pairs = _pairs(shapes, seed=4)
    tensors = {}
    for name, (down, up) in pairs.items():
        tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = down, up
    path = _write(tmp_path / "peft.safetensors", tensors)
    before = _run(base)
    ours = _run(_lora_component(base, path, 1.0))
    reference = _run(Component(_merged_diffusers(base, pairs, 1.0, 1.0), "diffusion", "ref", F32))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(_run(base), before)  # hooks removed: the shared model is exactly the base again
    assert torch.equal(_run(_lora_component(base, path, 0.0)), before)  # strength 0 is the base exactly


def test_a_lora_for_another_model_is_refused(base, tmp_path):
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 128),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4)}
    path = _write(tmp_path / "flux_style.safetensors", flux)
    with pytest.raises(ModelFileError, match="LoRA for FLUX.1, not for Z-Image"):
        _lora_component(base, path, 1.0)


def test_lora_node_feeds_the_progressive_node(models_root, torch_runtime):
    pairs = _pairs({"layers.0.feed_forward.w2": (128, 341)}, seed=5)
    down, up = pairs["layers.0.feed_forward.w2"]
    (models_root / "loras").mkdir(exist_ok=True)
    _write(models_root / "loras" / "zimage_character.safetensors",
           {"diffusion_model.layers.0.feed_forward.w2.lora_down.weight": down,
            "diffusion_model.layers.0.feed_forward.w2.lora_up.weight": up * 20})
    model, text, vae = call_node(zn.EditKitZImageLoader, diffusers_folder=zm.FOLDER, weight_dtype="fp32")
    (lora_model,) = call_node(zn.EditKitZImageLora, model=model, lora_name="zimage_character.safetensors",
                              strength=0.8)
    stages = "progressive_stages:\n  stage1: {height: 32, width: 32, num_inference_steps: 2}\n"
    common = dict(text_encoder=text, vae=vae, prompt="sks woman, portrait", negative_prompt="", seed=1,
                  stages=stages, decode_stages=False)
    with_lora = call_node(zn.EditKitZImageProgressive, model=lora_model, **common)[1]["samples"]
    without = call_node(zn.EditKitZImageProgressive, model=model, **common)[1]["samples"]
    assert (with_lora - without).abs().max() > 1e-3
    assert torch.equal(call_node(zn.EditKitZImageProgressive, model=model, **common)[1]["samples"], without)
