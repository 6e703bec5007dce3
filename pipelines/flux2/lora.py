"""FLUX.2's entry in the LoRA mechanism (:mod:`..core.lora`).

diffusers' ``Flux2LoraLoaderMixin.lora_state_dict`` reads the layouts FLUX.2 [klein] LoRAs are published in:
diffusers/PEFT keys (``transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight``), BFL/ComfyUI
keys as ai-toolkit writes them (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``, fused qkv split
by diffusers) and kohya files (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` with ``.alpha``), so
EditKit adds no key rules of its own.
"""

from __future__ import annotations

from ..core.lora import LoraFamily, diffusers_converter

FLUX2_LORA = LoraFamily(
    name="flux2",
    display="FLUX.2 [klein]",
    architecture="FLUX.2",
    convert=diffusers_converter("Flux2LoraLoaderMixin", bare=True),
    expected=(
        "a FLUX.2 [klein] LoRA .safetensors in models/loras (diffusers/PEFT keys like 'transformer."
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight', ai-toolkit/BFL keys like "
        "'diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight', or kohya keys)"
    ),
)
