"""FLUX.1 (dev, Fill, Kontext-inpaint's widened Fill), declared once (:class:`~..core.family.Family`)."""

from __future__ import annotations

from ..core.family import Family
from . import loading, text, vae
from .lora import FLUX_LORA

FAMILY = Family(
    name="FLUX.1",
    transformer=loading.TRANSFORMER,
    vae=loading.VAE,
    text_encoder=text.text_encoder_source,
    scheduler=loading.CONFIG_DIR / "flux_scheduler" / "scheduler_config.json",
    latent_format=vae.latent_format,
    lora=FLUX_LORA,
    pipelines=("FluxFillPipeline", "FluxPipeline"),
)
