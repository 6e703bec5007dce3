"""The Qwen-Image latent format, declared once: 16 channels, 8x spatial factor, per-channel mean/std.

Qwen-Image's VAE (a Wan-2.1-style causal 3-D VAE used on single frames) produces **raw** latents;
the transformer works on ``(raw - mean) / std`` per channel (**model space**), which is ComfyUI's
``Wan21`` latent format (also used for step previews). ComfyUI's LATENT stores the raw form, so
the LATENT boundary converts with :data:`QWEN_IMAGE` (:class:`..core.latent_format.LatentFormat`)
and nothing else in the package knows the numbers. The transformer reads 2x2 latent patches as
tokens, channel-major (feature = c*4 + py*2 + px), exactly as diffusers'
``QwenImageEditPlusPipeline._pack_latents``.
"""

from __future__ import annotations

import torch
from einops import rearrange

from ..core.latent_format import LatentFormat

PATCH = 2  # latent pixels per token side
SPATIAL = 8  # pixels per latent pixel
MULTIPLE = SPATIAL * PATCH  # pixel sizes are multiples of this: one token covers 16x16 pixels
CHANNELS = 16
PREVIEW = "Wan21"

# The published AutoencoderKLQwenImage statistics (its config's latents_mean / latents_std).
MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
       3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916)
QWEN_IMAGE = LatentFormat.per_channel(MEAN, STD, SPATIAL, PREVIEW)


def format_of(vae_config) -> LatentFormat:
    """The format of a loaded VAE: its config's statistics when it has them, else Qwen-Image's."""
    mean = vae_config.get("latents_mean") if vae_config is not None else None
    std = vae_config.get("latents_std") if vae_config is not None else None
    if not mean or not std:
        return QWEN_IMAGE
    return LatentFormat.per_channel(mean, std, SPATIAL, PREVIEW)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W]`` latents → ``[B,(H/2)(W/2),4C]`` tokens."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpack(tokens: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a ``latent_h x latent_w`` latent."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=latent_h // PATCH, ph=PATCH, pw=PATCH)
