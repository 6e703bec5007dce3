"""FLUX.2's latent format, declared once: raw VAE space ↔ the transformer's packed model space.

* **raw** (what ComfyUI's LATENT holds here): the FLUX.2 VAE encoder's output, ``[B, 32, H/8, W/8]``;
* **model space**: the raw latent cut into 2x2 patches (``[B, 128, H/16, W/16]``, 32 channels x 4 positions),
  then normalised per patch channel by the VAE's own batch-norm statistics:
  ``(patch - running_mean) / sqrt(running_var + eps)``. Those statistics are weights of the VAE file, not
  constants, so the format is built from the loaded VAE (:func:`latent_format`);
* **tokens**: model space flattened row by row, ``[B, H/16 * W/16, 128]``, with 4-D position ids
  ``(t, row, col, layer)``: ``t = 0`` for the picture being made, ``10, 20, ...`` for reference pictures,
  text tokens at ``(0, 0, 0, index)``, as diffusers' ``Flux2KleinPipeline`` builds them.
"""

from __future__ import annotations

import torch

from ..core.errors import EditKitError
from ..core.latent_format import LatentFormat
from ..core.runtime import Component

LATENT_CHANNELS = 32
PATCH = 2
MODEL_CHANNELS = LATENT_CHANNELS * PATCH * PATCH
VAE_SCALE = 8
SIZE_MULTIPLE = VAE_SCALE * PATCH  # 16 pixels per token side
REFERENCE_T_STEP = 10  # position-id time offset between reference pictures (diffusers' scale=10)
PREVIEW = "Flux2"  # ComfyUI's latent_formats class for FLUX.2 (newer ComfyUI); without it no previews


def latent_format(vae: Component) -> LatentFormat:
    """The per-channel format of the patchified latent, from the VAE's batch-norm statistics."""
    module = vae.module
    mean = module.bn.running_mean.detach().float().cpu()
    std = torch.sqrt(module.bn.running_var.detach().float().cpu() + float(module.config.batch_norm_eps))
    return LatentFormat.per_channel(mean.tolist(), std.tolist(), spatial=SIZE_MULTIPLE, preview=PREVIEW)


def patchify(raw: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, 4C, h/2, w/2]`` (channel-major, then the 2x2 position), as the FLUX.2 VAE's bn expects."""
    b, c, h, w = raw.shape
    return raw.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(model: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c4, h, w = model.shape
    c = c4 // 4
    return model.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → tokens ``[B, h*w, C]`` in raster order."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens ``[B, h*w, C]`` in raster order → ``[B, C, h, w]``."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def raw_to_model(vae: Component, raw: torch.Tensor) -> torch.Tensor:
    """Raw ``[B, 32, h, w]`` → model space ``[B, 128, h/2, w/2]`` (float32)."""
    return latent_format(vae).to_model(patchify(raw.float()))


def model_to_raw(vae: Component, model: torch.Tensor) -> torch.Tensor:
    """Model space ``[B, 128, h, w]`` → raw ``[B, 32, 2h, 2w]`` (float32)."""
    return unpatchify(latent_format(vae).to_raw(model.float()))


def positions(t: int, h: int, w: int) -> torch.Tensor:
    """Position ids ``[h*w, 4]`` of a ``h`` x ``w`` token grid at time ``t`` (``(t, row, col, 0)``, raster order)."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))


def text_positions(length: int) -> torch.Tensor:
    """Position ids ``[length, 4]`` of text tokens: ``(0, 0, 0, index)``."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))


def read_latent(samples: torch.Tensor, what: str = "latent") -> torch.Tensor:
    """A LATENT's samples checked to be raw FLUX.2 latents ``[B, 32, h, w]`` with even sides."""
    if samples.ndim != 4 or samples.shape[1] != LATENT_CHANNELS:
        raise EditKitError(
            f"The {what} has shape {tuple(samples.shape)}; FLUX.2 [klein] needs a 32-channel FLUX.2-VAE latent "
            "[batch, 32, height/8, width/8]. Encode the picture with the FLUX.2 VAE (flux2-vae.safetensors), or "
            "decode a latent of another model with its own VAE first."
        )
    if samples.shape[-1] % PATCH or samples.shape[-2] % PATCH:
        raise EditKitError(
            f"The {what} is {samples.shape[-1]}x{samples.shape[-2]} latent pixels; FLUX.2 needs even sides "
            "(pictures whose sides are multiples of 16)."
        )
    return samples
