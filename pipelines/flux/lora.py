"""FLUX.1's entry in the LoRA mechanism (:mod:`..core.lora`): diffusers' converter plus three key fixes.

diffusers' ``FluxLoraLoaderMixin.lora_state_dict`` reads diffusers/PEFT files, kohya
(``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``.alpha``) and ComfyUI/BFL original
keys with ``lora_down``/``lora_up`` (``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``).
Four gaps are filled here, before it runs:

* keys with no prefix at all, as lightx2v writes its Lightning LoRAs (``<module>.lora_down.weight`` +
  ``.alpha``), get the prefix their module tree implies: ``diffusion_model.`` for BFL modules
  (``double_blocks``, ``single_blocks``, ...), diffusers/PEFT names for diffusers modules;
* original-key files that use PEFT's ``lora_A``/``lora_B`` names with ``diffusion_model.`` keys
  (what several trainers export "for ComfyUI") are renamed to the kohya form diffusers reads;
* diffusers splits a single block's fused ``linear1`` (q, k, v and the MLP input) at the fixed
  FLUX.1 width 3072 (as it does for checkpoints; see :mod:`.layout`). EditKit splits it itself at
  the width the LoRA has (``linear1`` has 7 x width rows: 3 attention + 4 MLP), so the same code
  serves the real files and narrower models. The down matrix is shared by the four parts and the
  up matrix split by rows, which is exactly ``delta W`` of the fused layer cut into its parts;
* diffusers drops the ``alpha`` of kohya/original ``final_layer`` LoRAs (its converter leaves alphas
  unhandled there), which would run those layers at ``r / alpha`` times their strength;
  EditKit converts ``final_layer`` itself, with the alpha.
"""

from __future__ import annotations

import re

import torch

from ..core.lora import LoraFamily, diffusers_converter, record_layer

_ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_PREFIXES = (*_ORIGINAL_PREFIXES, "transformer.", "base_model.", "lora_", "text_encoder", "te.", "te1.", "te2.")
_BFL_MODULES = ("double_blocks.", "single_blocks.", "final_layer.", "img_in.", "txt_in.", "time_in.", "vector_in.",
                "guidance_in.")
_BARE_SUFFIXES = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight", ".alpha": ".alpha"}
_RENAMES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight",
            ".lora_down.weight": ".lora_down.weight", ".lora_up.weight": ".lora_up.weight", ".alpha": ".alpha"}
_OWN = re.compile(r"^lora_unet_(single_blocks_(\d+)_linear1|final_layer_linear|final_layer_adaLN_modulation_1)"
                  r"\.(lora_down\.weight|lora_up\.weight|alpha)$")

_convert_with_diffusers = diffusers_converter("FluxLoraLoaderMixin", returns_alphas=True)


def _with_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unprefixed ``<module>.lora_down/up.weight`` / ``.alpha`` keys → BFL or diffusers/PEFT keys; others unchanged."""
    out = {}
    for key, tensor in state_dict.items():
        suffix = next((s for s in _BARE_SUFFIXES if key.endswith(s)), None)
        if suffix is None or key.startswith(_PREFIXES):
            out[key] = tensor
        elif key.startswith(_BFL_MODULES):
            out["diffusion_model." + key] = tensor
        else:
            out["transformer." + key[: -len(suffix)] + _BARE_SUFFIXES[suffix]] = tensor
    return out


def _to_kohya(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original (BFL/ComfyUI) keys → kohya form; other keys unchanged."""
    out = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in _ORIGINAL_PREFIXES if key.startswith(p)), None)
        suffix = next((s for s in _RENAMES if key.endswith(s)), None)
        if prefix is None or suffix is None:
            out[key] = tensor
            continue
        module = key[len(prefix): -len(suffix)]
        out["lora_unet_" + module.replace(".", "_") + _RENAMES[suffix]] = tensor
    return out


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation rows are (shift, scale); diffusers' ``norm_out.linear`` has (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _convert_own(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Convert the kohya-form layers diffusers gets wrong; leave the rest for diffusers.

    ``single_blocks.N.linear1`` is split at the LoRA's own width; ``final_layer`` keeps its alpha
    (diffusers drops it, so such layers would run at ``r / alpha`` times their strength). Returns
    the remaining state dict, the converted diffusers-key tensors and their alphas.
    """
    rest, groups = {}, {}
    for key, tensor in state_dict.items():
        match = _OWN.match(key)
        if match:
            groups.setdefault(match.group(1), {})[match.group(3)] = tensor
        else:
            rest[key] = tensor
    converted, alphas = {}, {}
    for name, parts in groups.items():
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            raise ValueError(f"'{name}' has no {'lora_up' if up is None else 'lora_down'} matrix")
        if name.endswith("_linear1"):
            if up.shape[0] % 7:
                raise ValueError(f"'{name}' has {up.shape[0]} output rows; FLUX.1's linear1 has 7 x width")
            width = up.shape[0] // 7
            block = f"single_transformer_blocks.{name.split('_')[2]}."
            targets = zip((block + t for t in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
                          torch.split(up, [width, width, width, 4 * width], dim=0), strict=True)
        elif name == "final_layer_linear":
            targets = [("proj_out", up)]
        else:
            targets = [("norm_out.linear", _swap_halves(up))]
        record_layer(converted, alphas, targets, down, parts.get("alpha"))
    return rest, converted, alphas


def convert_flux_lora(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Any FLUX.1 LoRA layout → diffusers keys (``[transformer.]<module>.lora_A/B.weight``) and alphas."""
    rest, own, own_alphas = _convert_own(_to_kohya(_with_prefix(state_dict)))
    converted, alphas = _convert_with_diffusers(rest) if rest else ({}, {})
    converted = dict(converted)
    converted.update(own)
    alphas.update(own_alphas)
    return converted, alphas


FLUX_LORA = LoraFamily(
    name="flux",
    display="FLUX.1",
    architecture="FLUX.1",
    convert=convert_flux_lora,
    expected=(
        "a FLUX.1 LoRA .safetensors in models/loras: diffusers/PEFT keys ('transformer.transformer_blocks.0.attn."
        "to_q.lora_A.weight'), kohya keys ('lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight' with "
        "'.alpha') or ComfyUI/BFL keys ('diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight' or "
        "'.lora_A.weight')"
    ),
)
