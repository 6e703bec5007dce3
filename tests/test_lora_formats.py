"""Every published LoRA layout, for every family that takes LoRAs: the weight change is exactly strength x alpha/r x B.A.

A small fixture is written for each (family, layout) with seeded matrices on a handful of layers (including fused
ones: FLUX.1's ``qkv`` / ``linear1`` / ``final_layer``, Z-Image's ``attention.qkv``). It is read with the family's
LoRA entry and applied to the tiny transformer the way samplers apply it; then every linear layer's effective
weight is read through its own forward (``layer(I) - layer(0)`` is ``W^T``), with and without the LoRA. The
expected change is computed here from the fixture's tensors alone, in float64: ``strength * alpha / r * B @ A``
per named layer in the file's own key space, carried to diffusers' module tree by the checkpoint converters
(EditKit's BFL layout code, diffusers' Z-Image converter; Qwen-Image names are the same in both), which share
nothing with the LoRA code. Every other layer must not change at all.

Layouts (what each trainer or publisher writes):

* ``kohya``: ``lora_unet_<original module, '_' for '.'>.lora_down/up.weight`` + ``.alpha`` (sd-scripts, ai-toolkit);
* ``comfyui``: ``diffusion_model.<original module>.lora_down/up.weight`` + ``.alpha`` (ComfyUI / BFL keys);
* ``comfyui_ab``: the same keys with PEFT's ``lora_A/lora_B`` names and no alpha;
* ``peft`` / ``peft_alpha``: ``transformer.<diffusers module>.lora_A/B.weight``, without / with ``.alpha``
  (diffusers' own ``save_lora_weights``; with alphas as several trainers add them);
* ``peft_metadata``: diffusers' LoRA with its ``LoraConfig`` in ``lora_adapter_metadata`` (``r``, ``lora_alpha``,
  ``alpha_pattern``, ``rank_pattern``);
* ``peft_saved``: PEFT's own ``save_pretrained`` keys, ``base_model.model.<module>.lora_A/B.weight``;
* ``lightning``: lightx2v's Lightning files, ``<diffusers module>.lora_down/up.weight`` + ``.alpha`` with no
  prefix (Qwen-Image-Lightning, Qwen-Image-Edit-2509-Lightning).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import save_file

from editkit.pipelines.core import lora as core_lora
from editkit.pipelines.core.runtime import Component
from editkit.pipelines.flux import layout as flux_layout
from editkit.pipelines.flux.kontext_inpaint import widen_fill_transformer
from editkit.pipelines.flux.lora import FLUX_LORA
from editkit.pipelines.qwen_image.lora import QWEN_IMAGE_LORA
from editkit.pipelines.zimage.lora import ZIMAGE_LORA
from tiny import zimage as zm
from tiny.flux1 import TINY_TRANSFORMER as FLUX_TINY
from tiny.qwen_image import TINY_TRANSFORMER as QWEN_TINY

F32, F64 = torch.float32, torch.float64
RANK = 4
ALPHA = 8.0
STRENGTH = 0.7


@dataclass
class Family:
    """A family's tiny model, the modules its LoRAs name in each key space, and how that space maps to diffusers."""

    lora: core_lora.LoraFamily
    model: torch.nn.Module
    original: list[str]  # modules in the original (ComfyUI/BFL) tree
    diffusers: list[str]  # modules in diffusers' tree
    to_original: object  # diffusers state dict -> original state dict (without prefixes)
    to_diffusers: object  # the inverse
    cache: dict = field(default_factory=dict)  # what does not change between layouts: base weights, conversions

    def cached(self, key: str, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def _flux_fill():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(1)
    return FluxTransformer2DModel(**FLUX_TINY).eval()


def _flux(model) -> Family:
    return Family(
        FLUX_LORA, model,
        original=["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0",
                  "double_blocks.0.txt_mod.lin", "single_blocks.0.linear1", "single_blocks.0.linear2",
                  "final_layer.linear", "final_layer.adaLN_modulation.1"],
        diffusers=["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
                   "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.norm1_context.linear",
                   "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out", "proj_out"],
        to_original=flux_layout.diffusers_transformer_to_bfl, to_diffusers=flux_layout.bfl_transformer_to_diffusers,
    )


def _qwen() -> Family:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(2)
    model = QwenImageTransformer2DModel(**QWEN_TINY).eval()
    modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
               "transformer_blocks.1.attn.to_add_out", "transformer_blocks.0.img_mlp.net.0.proj",
               "transformer_blocks.1.txt_mlp.net.2", "transformer_blocks.0.img_mod.1", "img_in", "proj_out"]
    return Family(QWEN_IMAGE_LORA, model, original=modules, diffusers=modules, to_original=dict,
                  to_diffusers=dict)


def _zimage() -> Family:
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    def to_original(sd):
        return {k.removeprefix(zm.COMFY_PREFIX): v for k, v in zm.diffusers_to_comfy(sd).items()}

    def to_diffusers(sd):
        return convert_z_image_transformer_checkpoint_to_diffusers({zm.COMFY_PREFIX + k: v for k, v in sd.items()})

    return Family(
        ZIMAGE_LORA, zm.FAMILY.build("transformer"),
        original=["layers.0.attention.qkv", "layers.1.attention.out", "layers.0.feed_forward.w2",
                  "noise_refiner.0.adaLN_modulation.0", "context_refiner.0.feed_forward.w1", "final_layer.linear"],
        diffusers=["layers.0.attention.to_q", "layers.0.attention.to_v", "layers.1.attention.to_out.0",
                   "layers.1.feed_forward.w3", "noise_refiner.0.attention.to_k", "context_refiner.0.feed_forward.w2",
                   "layers.0.adaLN_modulation.0"],
        to_original=to_original, to_diffusers=to_diffusers,
    )


@pytest.fixture(scope="module")
def families() -> dict[str, Family]:
    fill = _flux_fill()
    return {"flux_fill": _flux(fill), "flux_kontext": _flux(widen_fill_transformer(copy.deepcopy(fill))),
            "qwen_image": _qwen(), "zimage": _zimage()}


# Which layouts each family's LoRAs are published in (key space: original or diffusers).
ORIGINAL_LAYOUTS = ("kohya", "comfyui", "comfyui_ab")
DIFFUSERS_LAYOUTS = ("peft", "peft_alpha", "peft_metadata", "peft_saved", "lightning")
CASES = [(family, layout) for family in ("flux_fill", "flux_kontext", "qwen_image", "zimage")
         for layout in ORIGINAL_LAYOUTS + DIFFUSERS_LAYOUTS]


def _shapes(family: Family, space: str) -> dict[str, tuple[int, int]]:
    sd = family.model.state_dict()
    if space == "original":
        sd = family.to_original(sd)
    names = family.original if space == "original" else family.diffusers
    return {m: tuple(sd[f"{m}.weight"].shape) for m in names}


def write_fixture(path, family: Family, layout: str, seed: int = 5):
    """The LoRA file; returns ``{module: (down, up, scale)}`` in the layout's key space and that space."""
    space = "original" if layout in ORIGINAL_LAYOUTS else "diffusers"
    g = torch.Generator().manual_seed(seed)
    tensors, metadata, layers = {}, None, {}
    for i, (module, (out_f, in_f)) in enumerate(_shapes(family, space).items()):
        rank = RANK + (i % 2) * 2  # ranks 4 and 6 alternate: alpha / r differs per layer
        down, up = torch.randn(rank, in_f, generator=g) * 0.2, torch.randn(out_f, rank, generator=g) * 0.2
        alpha = ALPHA + i  # and so do the alphas
        if layout == "kohya":
            stem, a, b = "lora_unet_" + module.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
        elif layout in ("comfyui", "comfyui_ab"):
            stem = f"diffusion_model.{module}"
            a, b = (".lora_A.weight", ".lora_B.weight") if layout == "comfyui_ab" else (".lora_down.weight",
                                                                                         ".lora_up.weight")
        elif layout == "peft_saved":
            stem, a, b = f"base_model.model.{module}", ".lora_A.weight", ".lora_B.weight"
        elif layout == "lightning":
            stem, a, b = module, ".lora_down.weight", ".lora_up.weight"
        else:
            stem, a, b = f"transformer.{module}", ".lora_A.weight", ".lora_B.weight"
        tensors[stem + a], tensors[stem + b] = down, up
        if layout in ("kohya", "comfyui", "peft_alpha", "lightning"):
            tensors[stem + ".alpha"] = torch.tensor(alpha)
            scale = alpha / rank
        else:
            scale = 1.0
        layers[module] = (down, up, scale)
    if layout == "peft_metadata":  # diffusers' saved LoraConfig: r / lora_alpha with per-module patterns
        first, second = list(layers)[:2]
        config = {"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA",
                  "rank_pattern": {m: down.shape[0] for m, (down, _, _) in layers.items() if down.shape[0] != RANK},
                  "alpha_pattern": {first: 3.0, second: 12.0}}
        metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
        for module, (down, up, _) in layers.items():
            alpha = config["alpha_pattern"].get(module, ALPHA)
            layers[module] = (down, up, alpha / down.shape[0])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path, layers, space


def expected_deltas(family: Family, layers: dict, space: str) -> dict[str, torch.Tensor]:
    """Per diffusers layer, ``strength * alpha / r * B @ A`` in float64, from the fixture's own tensors."""
    base = family.cached("base", lambda: {k: v.to(F64) for k, v in family.model.state_dict().items()})
    # (the converters may consume the dict they get: each call gets its own copy)
    start = family.cached("original", lambda: family.to_original(dict(base))) if space == "original" else base
    changed = dict(start)
    for module, (down, up, scale) in layers.items():
        changed[f"{module}.weight"] = start[f"{module}.weight"] + STRENGTH * scale * (up.to(F64) @ down.to(F64))
    if space == "original":
        before = family.cached("round_trip", lambda: family.to_diffusers(dict(start)))
        after = family.to_diffusers(changed)
    else:
        before, after = start, changed
    return {k[: -len(".weight")]: after[k] - before[k] for k in after
            if k.endswith(".weight") and not torch.equal(after[k], before[k])}


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each linear layer's weight as its forward applies it (LoRA hooks included): ``layer(I) - layer(0)``."""
    out = {}
    with torch.inference_mode():
        for name, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear):
                eye = torch.eye(layer.in_features, dtype=F32)
                out[name] = (layer(eye) - layer(torch.zeros(1, layer.in_features, dtype=F32))).T.to(F64)
    return out


@pytest.mark.parametrize(("family_name", "layout"), CASES)
def test_weight_change_is_strength_alpha_over_rank_b_a(families, tmp_path, family_name, layout):
    family = families[family_name]
    path, layers, space = write_fixture(tmp_path / f"{family_name}_{layout}.safetensors", family, layout)
    weights = core_lora.read_lora(path, family.lora)
    component = Component(family.model, "diffusion", family_name, F32)
    before = family.cached("weights", lambda: effective_weights(family.model))
    with core_lora.applied_loras(component, ((weights, STRENGTH),)):
        after = effective_weights(family.model)
    expected = expected_deltas(family, layers, space)
    assert expected and set(expected) <= set(after)  # the fixture names real layers
    for name in after:
        change = after[name] - before[name]
        if name in expected:
            error = (change - expected[name]).abs().max().item()
            assert error < 1e-5, (name, error, expected[name].abs().max().item())
        else:
            assert torch.equal(after[name], before[name]), name  # layers the LoRA does not name stay exactly
    assert all(torch.equal(w, before[n]) for n, w in effective_weights(family.model).items())  # hooks removed


def test_explicit_alphas_win_over_metadata_and_rslora_divides_by_sqrt_rank(families, tmp_path):
    """Per-layer ``.alpha`` tensors are what the layer says; a saved config with ``use_rslora`` scales alpha/sqrt(r)."""
    family = families["qwen_image"]
    g = torch.Generator().manual_seed(8)
    module = "transformer_blocks.0.attn.to_q"
    down, up = torch.randn(RANK, 128, generator=g), torch.randn(128, RANK, generator=g)
    config = {"transformer.r": RANK, "transformer.lora_alpha": 6.0, "transformer.use_rslora": True}
    save_file({f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up},
              str(tmp_path / "rslora.safetensors"), metadata={"lora_adapter_metadata": json.dumps(config)})
    layer = core_lora.read_lora(tmp_path / "rslora.safetensors", family.lora).layers[module]
    assert layer.scale == pytest.approx(6.0 / RANK ** 0.5)
    save_file({"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": down,
               "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight": up,
               "lora_unet_transformer_blocks_0_attn_to_q.alpha": torch.tensor(2.0)}, str(tmp_path / "k.safetensors"))
    layer = core_lora.read_lora(tmp_path / "k.safetensors", family.lora).layers[module]
    torch.testing.assert_close(layer.scale * layer.up @ layer.down, 2.0 / RANK * up @ down)
