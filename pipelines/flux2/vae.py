"""FLUX.2 VAE encode/decode in raw space (``[B, 32, H/8, W/8]``), pixels ``[B, 3, H, W]`` in 0..1.

Encoding uses the distribution's mode, as ``Flux2KleinPipeline`` (``sample_mode="argmax"``) and ComfyUI
do. Batches run in chunks with the FLUX.1 VAE's out-of-memory fallback (one by one, tiled): the FLUX.2
VAE is FLUX.1's architecture with 32 latent channels, so the same budgets and tiling apply.
"""

from __future__ import annotations

import torch

from ..core.runtime import Component, Runtime
from ..flux.vae import _DECODE_PER_PIXEL, _ENCODE_PER_PIXEL, _bytes, _in_chunks


@torch.inference_mode()
def encode_raw(vae: Component, pixels: torch.Tensor, runtime: Runtime, chunk: int = 4) -> torch.Tensor:
    """Pixels ``[B, 3, H, W]`` in 0..1 → raw latents ``[B, 32, H/8, W/8]`` (float32, runtime device)."""
    b, _, h, w = pixels.shape
    device = runtime.acquire(vae, memory_required=_bytes(_ENCODE_PER_PIXEL, min(b, chunk), h, w, vae.dtype))

    def run(start: int, stop: int) -> torch.Tensor:
        x = pixels[start:stop].to(device=device, dtype=vae.dtype) * 2.0 - 1.0
        return vae.module.encode(x).latent_dist.mode().float()

    return _in_chunks(vae, run, b, chunk, runtime)


@torch.inference_mode()
def decode_raw(vae: Component, raw: torch.Tensor, runtime: Runtime, chunk: int = 4) -> torch.Tensor:
    """Raw latents ``[B, 32, h, w]`` → pixels ``[B, 3, 8h, 8w]`` in 0..1 (float32, runtime device)."""
    b, _, h, w = raw.shape
    device = runtime.acquire(vae, memory_required=_bytes(_DECODE_PER_PIXEL, min(b, chunk), h * 8, w * 8, vae.dtype))

    def run(start: int, stop: int) -> torch.Tensor:
        z = raw[start:stop].to(device=device, dtype=vae.dtype)
        image = vae.module.decode(z).sample
        return (image.float() / 2.0 + 0.5).clamp(0.0, 1.0)

    return _in_chunks(vae, run, b, chunk, runtime)
