"""Qwen-Image VAE encode/decode between pixels and model-space latents.

``AutoencoderKLQwenImage`` is a causal video VAE; single pictures are one frame (``[B,C,1,H,W]``).
Encoding takes the distribution's mode (deterministic, as diffusers' edit pipelines and ComfyUI
do). Pixels are ``[B,3,H,W]`` in 0..1 here; the VAE sees -1..1. A picture too large for the free
memory is retried in tiles (diffusers' own tiling) instead of failing, as ComfyUI's VAE nodes do.
"""

from __future__ import annotations

import logging

import torch

from ..core.latent_format import LatentFormat
from ..core.runtime import Component, Runtime
from .latent import format_of

log = logging.getLogger("EditKit")

# Working-memory budget per pixel (values, times the dtype size): ComfyUI's Wan-VAE figures.
_ENCODE_PER_PIXEL = 1600
_DECODE_PER_PIXEL = 3000


def latent_format(vae: Component) -> LatentFormat:
    return format_of(vae.module.config)


def _bytes(per_pixel: int, height: int, width: int, dtype: torch.dtype) -> int:
    return int(height * width * per_pixel * torch.tensor([], dtype=dtype).element_size())


def _one_by_one(vae: Component, run, batch: int, runtime: Runtime) -> torch.Tensor:
    try:
        return torch.cat([run(i) for i in range(batch)])
    except torch.OutOfMemoryError:
        log.warning("EditKit: out of memory in the Qwen-Image VAE; retrying in tiles.")
    runtime.empty_cache()
    vae.module.enable_tiling()
    try:
        return torch.cat([run(i) for i in range(batch)])
    finally:
        vae.module.disable_tiling()


@torch.inference_mode()
def encode(vae: Component, pixels: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Pixels ``[B,3,H,W]`` in 0..1 → model-space latents ``[B,16,H/8,W/8]`` (float32, runtime device)."""
    b, _, h, w = pixels.shape
    device = runtime.acquire(vae, memory_required=_bytes(_ENCODE_PER_PIXEL, h, w, vae.dtype))

    def run(i: int) -> torch.Tensor:
        x = pixels[i:i + 1].to(device=device, dtype=vae.dtype) * 2.0 - 1.0
        return vae.module.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0].float()

    return latent_format(vae).to_model(_one_by_one(vae, run, b, runtime))


@torch.inference_mode()
def decode(vae: Component, latents: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Model-space latents ``[B,16,h,w]`` → pixels ``[B,3,8h,8w]`` in 0..1 (float32, runtime device)."""
    b, _, h, w = latents.shape
    fmt = latent_format(vae)
    device = runtime.acquire(vae, memory_required=_bytes(_DECODE_PER_PIXEL, h * fmt.spatial, w * fmt.spatial, vae.dtype))

    def run(i: int) -> torch.Tensor:
        z = fmt.to_raw(latents[i:i + 1].to(device=device, dtype=torch.float32))
        image = vae.module.decode(z.to(vae.dtype).unsqueeze(2), return_dict=False)[0][:, :, 0]
        return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    return _one_by_one(vae, run, b, runtime)
