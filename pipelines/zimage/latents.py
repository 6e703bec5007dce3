"""Resizing raw latents between progressive stages, the way ComfyUI's LatentUpscale nodes do.

ComfyUI's LatentUpscale / LatentUpscaleBy resize the raw-space LATENT with
``torch.nn.functional.interpolate(samples, size=(h, w), mode=method)`` (its ``common_upscale``
without cropping), LatentUpscale to ``pixels // 8`` after raising a side below 64 pixels to 64
(:func:`upscale_size`), and LatentUpscaleBy to ``round(latent_side * factor)`` with no lower bound
(:func:`scaled_size`). The progressive recipe sizes its stages by those two rules and resizes with
the same call on the same raw-space tensor, so the one-node recipe and the modular graph of native
nodes agree exactly.
``bislerp`` (ComfyUI's own slerp interpolation) is not offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import EditKitError

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")
VAE_SCALE = 8
MIN_SIDE = 64  # LatentUpscale's smallest target side, in pixels


def upscale_size(width: int, height: int) -> tuple[int, int]:
    """The picture size LatentUpscale really resizes to for a ``width`` x ``height`` target (sides >= 64)."""
    return max(MIN_SIDE, width), max(MIN_SIDE, height)


def upscale_raw(latents: torch.Tensor, width: int, height: int, method: str = "nearest-exact") -> torch.Tensor:
    """Resize raw latents ``[B,C,h,w]`` to the latent size of a ``width`` x ``height`` picture.

    The size is taken as given: LatentUpscale's own target is :func:`upscale_size` of what its widgets say,
    LatentUpscaleBy's is :func:`scaled_size`.
    """
    if method not in UPSCALE_METHODS:
        raise EditKitError(f"Unknown upscale method '{method}'. Use one of: {', '.join(UPSCALE_METHODS)}.")
    size = (height // VAE_SCALE, width // VAE_SCALE)
    if tuple(latents.shape[-2:]) == size:
        return latents
    return F.interpolate(latents, size=size, mode=method)


def scaled_size(latent_w: int, latent_h: int, factor: float) -> tuple[int, int]:
    """Picture size LatentUpscaleBy gives a ``latent_w`` x ``latent_h`` latent (``round(side * factor)``)."""
    return round(latent_w * factor) * VAE_SCALE, round(latent_h * factor) * VAE_SCALE
