"""Qwen-Image-Edit (2509, 2511, the first Edit) and Qwen-Image-Layered, declared once each
(:class:`~..core.family.Family`). Both use Qwen2.5-VL and Qwen-Image's scheduler; Layered has its own
transformer switches and RGBA VAE, and no LoRA node yet."""

from __future__ import annotations

import dataclasses

from ..core.family import Family
from . import layered_loading, loading, text, vae
from .lora import QWEN_IMAGE_LORA

SCHEDULER = loading.CONFIG_DIR / "scheduler" / "scheduler_config.json"

FAMILY = Family(
    name="Qwen-Image-Edit",
    transformer=loading.TRANSFORMER,
    vae=loading.VAE,
    text_encoder=text.text_encoder_source,
    scheduler=SCHEDULER,
    latent_format=vae.latent_format,
    lora=QWEN_IMAGE_LORA,
    pipelines=loading.EDIT_PIPELINES,
    fp16=False,
    transformer_source=loading.transformer_source,
)

LAYERED = dataclasses.replace(  # Qwen-Image with its own transformer switches and RGBA VAE; no LoRA node yet
    FAMILY, name="Qwen-Image-Layered", transformer=layered_loading.TRANSFORMER, vae=layered_loading.VAE, lora=None,
    pipelines=(), transformer_source=None,
)
