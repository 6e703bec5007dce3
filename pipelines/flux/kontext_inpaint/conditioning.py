"""The 32-channel conditioning: source latent + latent of the white "mask image".

Features 64:128 of every token carry the packed source latent and 128:192 the packed latent
of an RGB picture that is white (1.0) where editing is allowed and black (0.0) elsewhere; with
no mask the picture is pure white ("change anything"). Both use the model-space normalisation
``(z - 0.1159) * 0.3611`` and FLUX's 2x2 packing.
"""

from __future__ import annotations

import torch

from ...core.errors import EditKitError
from ...core.runtime import Component, Runtime
from .. import flow
from .. import vae as vae_ops


def mask_to_image(mask: torch.Tensor | None, batch: int, height: int, width: int) -> torch.Tensor:
    """The mask picture ``[B,3,H,W]``: the MASK (1 = may change) in all three channels; white if absent."""
    if mask is None:
        return torch.ones(1, 3, height, width).expand(batch, -1, -1, -1)
    if mask.shape[-2:] != (height, width):
        raise EditKitError(
            f"Mask is {mask.shape[-1]}x{mask.shape[-2]} but the source is {width}x{height}. "
            "Give a mask of the source's size, or leave the mask unconnected to allow changes everywhere."
        )
    if mask.shape[0] not in (1, batch):
        raise EditKitError(f"Got {mask.shape[0]} masks for {batch} sources. Give one mask or one per source.")
    return mask.float().clamp(0, 1).expand(batch, 3, height, width)


def mask_image_latent(vae: Component, mask: torch.Tensor | None, batch: int, height: int, width: int,
                      runtime: Runtime) -> torch.Tensor:
    """Model-space latent ``[B,16,H/8,W/8]`` of the mask picture (encoded once when it is shared).

    The pure white picture (no mask) is the same for every edit of a size, so its latent is kept
    on the VAE component (where results are kept: the CPU in ComfyUI) instead of VAE-encoding a
    constant on every run.
    """
    picture = mask_to_image(mask, batch, height, width)
    if mask is None:
        cache = vae.extras.setdefault("white_mask_latents", {})
        if (height, width) not in cache:
            cache[(height, width)] = vae_ops.encode(vae, picture[:1], runtime).to(runtime.intermediate_device)
        return cache[(height, width)].expand(batch, -1, -1, -1)
    if mask.shape[0] == 1:
        return vae_ops.encode(vae, picture[:1], runtime).expand(batch, -1, -1, -1)
    return vae_ops.encode(vae, picture, runtime)


def condition_tokens(source_latent: torch.Tensor, mask_latent: torch.Tensor) -> torch.Tensor:
    """Features 64:192 of every target token: ``[B,N,128]``."""
    return torch.cat([flow.pack(source_latent.float()), flow.pack(mask_latent.float())], dim=-1)
