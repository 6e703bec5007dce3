"""Qwen-Image's entry in the LoRA mechanism (:mod:`..core.lora`).

diffusers' ``QwenImageLoraLoaderMixin.lora_state_dict`` already reads the formats Qwen-Image LoRAs
are published in: diffusers/PEFT (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``),
ComfyUI/original keys (``diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight``), kohya
(``lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight`` with ``.alpha``) and the
``lora_down``/``lora_up`` + ``alpha`` files of the Lightning LoRAs (Qwen-Image-Lightning-4steps/8steps,
Qwen-Image-Edit-2509-Lightning). Qwen-Image's module tree has the same names in every layout, so no
key fixes are needed here.
"""

from __future__ import annotations

from ..core.lora import LoraFamily, diffusers_converter

QWEN_IMAGE_LORA = LoraFamily(
    name="qwen_image",
    display="Qwen-Image",
    architecture="Qwen-Image",
    convert=diffusers_converter("QwenImageLoraLoaderMixin", bare=True),
    expected="a Qwen-Image / Qwen-Image-Edit LoRA (e.g. Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors)",
)
