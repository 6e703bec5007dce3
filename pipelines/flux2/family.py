"""FLUX.2 [klein] (4B, 9B, base and distilled), declared once (:class:`~..core.family.Family`)."""

from __future__ import annotations

import functools

from ..core.family import Family
from ..zimage.text import text_encoder_source
from . import latent, loading
from .lora import FLUX2_LORA
from .text import Flux2TextEncoder

FAMILY = Family(
    name="FLUX.2 [klein]",
    transformer=loading.TRANSFORMER,
    vae=loading.VAE,
    text_encoder=functools.partial(text_encoder_source, wrapper=Flux2TextEncoder),  # Qwen3, klein's recipe
    scheduler=loading.SCHEDULER_CONFIG,
    latent_format=latent.latent_format,
    lora=FLUX2_LORA,
    pipelines=("Flux2KleinPipeline", "Flux2KleinInpaintPipeline"),
)
