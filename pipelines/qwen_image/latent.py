"""The Qwen-Image latent format, declared once: 16 channels, 8x spatial factor, per-channel mean/std.

Qwen-Image's VAE (a Wan-2.1-style causal 3-D VAE used on single frames) produces **raw** latents;
the transformer works on ``(raw - mean) / std`` per channel (**model space**), which is ComfyUI's
``Wan21`` latent format (also used for step previews). ComfyUI's LATENT stores the raw form, so
the LATENT boundary converts with :data:`QWEN_IMAGE` (:class:`..core.latent_format.LatentFormat`)
and nothing else in the package knows the numbers.

ComfyUI stores Wan-2.1 latents as videos, ``[B,16,T,H/8,W/8]`` (its VAE reads ``shape[4]``), and
Qwen-Image pictures as one frame, ``T = 1``. EditKit's LATENT outputs have that 5-D shape
(:func:`to_comfy`), so native VAEDecode, LatentUpscaleBy and SaveLatent work on them; LATENT inputs
take 5-D one-frame latents and also 4-D ones (what other packs, and EditKit before, wrote), read
by :func:`from_comfy`. Inside the package latents are 4-D ``[B,16,h,w]``. The transformer reads 2x2 latent patches as
tokens, channel-major (feature = c*4 + py*2 + px), exactly as diffusers'
``QwenImageEditPlusPipeline._pack_latents``.
"""

from __future__ import annotations

import torch
from einops import rearrange

from ..core.errors import EditKitError
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


def to_comfy(raw: torch.Tensor) -> torch.Tensor:
    """Raw latents ``[B,16,h,w]`` → ComfyUI's one-frame Wan-2.1 shape ``[B,16,1,h,w]``."""
    return raw.unsqueeze(2)


def from_comfy(samples: torch.Tensor, what: str = "latent") -> torch.Tensor:
    """A Qwen-Image LATENT's samples, 5-D ``[B,16,1,h,w]`` or 4-D ``[B,16,h,w]`` → ``[B,16,h,w]``."""
    shape = tuple(samples.shape)
    if samples.ndim == 5 and shape[2] != 1:
        raise EditKitError(
            f"The {what} holds {shape[2]} frames ({shape}): a video latent, but a Qwen-Image picture is one frame. "
            "ComfyUI's VAE Encode with the Qwen-Image VAE turns a batch of pictures into one video; encode one "
            "picture at a time (e.g. split the batch with ImageFromBatch) or take a single frame."
        )
    if samples.ndim not in (4, 5) or shape[1] != CHANNELS:
        raise EditKitError(
            f"The {what} has shape {shape}; Qwen-Image needs a {CHANNELS}-channel Qwen-Image VAE latent "
            f"[batch, {CHANNELS}, 1, height/8, width/8] (or [batch, {CHANNELS}, height/8, width/8]). Encode the "
            "picture with the Qwen-Image VAE (qwen_image_vae.safetensors)."
        )
    raw = samples[:, :, 0] if samples.ndim == 5 else samples
    if raw.shape[-1] % PATCH or raw.shape[-2] % PATCH:
        w, h = raw.shape[-1] * SPATIAL, raw.shape[-2] * SPATIAL
        raise EditKitError(
            f"The {what} is {w}x{h} pixels; Qwen-Image needs sides that are multiples of {MULTIPLE} pixels. Resize it "
            f"(e.g. LatentUpscale to {max(MULTIPLE, w // MULTIPLE * MULTIPLE)}x{max(MULTIPLE, h // MULTIPLE * MULTIPLE)})."
        )
    return raw


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W]`` latents → ``[B,(H/2)(W/2),4C]`` tokens."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpack(tokens: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a ``latent_h x latent_w`` latent."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=latent_h // PATCH, ph=PATCH, pw=PATCH)
