"""Z-Image-Turbo, declared once (:class:`~..core.family.Family`); its VAE is FLUX.1's (same files, same cache)."""

from __future__ import annotations

import dataclasses

from ..core.family import Family
from ..flux import loading as flux_loading
from ..flux import vae
from . import loading, text
from .lora import ZIMAGE_LORA

FAMILY = Family(
    name="Z-Image",
    transformer=loading.TRANSFORMER,
    vae=dataclasses.replace(
        flux_loading.VAE, what="Z-Image VAE",
        missing="No VAE: pick a diffusers folder or the FLUX.1 VAE file (ae.safetensors) in EditKit · Z-Image Loader."),
    text_encoder=text.text_encoder_source,
    scheduler=loading.SCHEDULER_CONFIG,
    latent_format=vae.latent_format,
    lora=ZIMAGE_LORA,
    pipelines=("ZImagePipeline",),
)
