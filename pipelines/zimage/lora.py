"""Z-Image's entry in the LoRA mechanism (:mod:`..core.lora`): diffusers' converter plus the original key layout.

diffusers' ``ZImageLoraLoaderMixin.lora_state_dict`` reads diffusers/PEFT files (``transformer.layers.0.
attention.to_q.lora_A.weight``), DiffSynth/ai-toolkit files and the dotted ``.lora.down`` form. What it does
not read are LoRAs keyed like the checkpoints ComfyUI loads (Z-Image's original module tree): the fused
``attention.qkv`` (it splits that only in the dotted form), ``attention.out`` with ``lora_A``/``lora_B``
names, ``x_embedder`` and ``final_layer``. EditKit maps those itself, for original keys
(``diffusion_model.layers.0.attention.qkv.lora_down.weight``) and their kohya spelling
(``lora_unet_layers_0_attention_qkv.lora_down.weight`` with ``.alpha``), before anything else goes to diffusers.
A fused ``qkv`` LoRA shares its down matrix between q, k and v and splits its up matrix by rows, which is
exactly the fused layer's ``delta W`` cut into the three projections.
"""

from __future__ import annotations

import re

import torch

from ..core.lora import LoraFamily, diffusers_converter, record_layer

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_ROLES = {".lora_down.weight": "down", ".lora_A.weight": "down", ".lora_up.weight": "up", ".lora_B.weight": "up",
          ".alpha": "alpha"}
_BLOCK = r"(layers|noise_refiner|context_refiner)[._](\d+)[._]"
_BLOCK_PARTS = {
    "attention_qkv": "attention.qkv", "attention.qkv": "attention.qkv",
    "attention_out": "attention.to_out.0", "attention.out": "attention.to_out.0",
    "attention_to_out_0": "attention.to_out.0", "attention.to_out.0": "attention.to_out.0",
    **{f"attention{sep}to_{p}": f"attention.to_{p}" for p in "qkv" for sep in "._"},
    **{f"feed_forward{sep}w{i}": f"feed_forward.w{i}" for i in (1, 2, 3) for sep in "._"},
    "adaLN_modulation_0": "adaLN_modulation.0", "adaLN_modulation.0": "adaLN_modulation.0",
}
_TOP_PARTS = {
    "x_embedder": "all_x_embedder.2-1", "final_layer_linear": "all_final_layer.2-1.linear",
    "final_layer.linear": "all_final_layer.2-1.linear",
    "final_layer_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
    "cap_embedder_1": "cap_embedder.1", "t_embedder_mlp_0": "t_embedder.mlp.0", "t_embedder_mlp_2": "t_embedder.mlp.2",
}
_BLOCK_RE = re.compile(rf"^{_BLOCK}(.+)$")

_convert_with_diffusers = diffusers_converter("ZImageLoraLoaderMixin", bare=True)


def _original_module(name: str) -> str | None:
    """The diffusers module of an original-layout (dotted or kohya) module name, else None."""
    match = _BLOCK_RE.match(name)
    if match:
        part = _BLOCK_PARTS.get(match.group(3))
        return None if part is None else f"{match.group(1)}.{match.group(2)}.{part}"
    return _TOP_PARTS.get(name)


def _split_original(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Pull out the original-layout LoRA layers; returns (rest for diffusers, converted, alphas)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), "lora_unet_" if key.startswith("lora_unet_")
                      else None)
        suffix = next((s for s in _ROLES if key.endswith(s)), None)
        module = None
        if prefix is not None and suffix is not None:
            module = _original_module(key[len(prefix): -len(suffix)])
        if module is None:
            rest[key] = tensor  # diffusers handles what it knows (and reports what nobody knows)
            continue
        groups.setdefault(module, {})[_ROLES[suffix]] = tensor
    converted, alphas = {}, {}
    for module, parts in groups.items():
        down, up = parts.get("down"), parts.get("up")
        if down is None or up is None:
            raise ValueError(f"the LoRA layer '{module}' has no {'up' if up is None else 'down'} matrix")
        if module.endswith(".attention.qkv"):
            if up.shape[0] % 3:
                raise ValueError(f"'{module}' has {up.shape[0]} output rows; a fused qkv has 3 x width")
            block = module[: -len(".qkv")]
            targets = [(f"{block}.to_{p}", rows) for p, rows in zip("qkv", up.chunk(3, dim=0), strict=True)]
        else:
            targets = [(module, up)]
        record_layer(converted, alphas, targets, down, parts.get("alpha"))
    return rest, converted, alphas


def convert_zimage_lora(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Any Z-Image LoRA layout → diffusers keys (``[transformer.]<module>.lora_A/B.weight``) and alphas."""
    rest, converted, alphas = _split_original(state_dict)
    if rest:
        converted.update(_convert_with_diffusers(rest)[0])
    return converted, alphas


ZIMAGE_LORA = LoraFamily(
    name="zimage",
    display="Z-Image",
    architecture="Z-Image",
    convert=convert_zimage_lora,
    expected=(
        "a Z-Image LoRA .safetensors in models/loras: diffusers/PEFT keys ('transformer.layers.0.attention.to_q."
        "lora_A.weight'), ComfyUI/original keys ('diffusion_model.layers.0.attention.qkv.lora_down.weight'), "
        "kohya keys ('lora_unet_layers_0_attention_qkv.lora_down.weight' with '.alpha') or DiffSynth/ai-toolkit "
        "files diffusers reads"
    ),
)
