"""FLUX.1 VAE encode/decode and the two latent spaces.

Three conventions meet here:

* **raw VAE space**: what the VAE's encoder produces. ComfyUI's LATENT stores this, so native
  nodes (VAEDecode, LatentUpscaleBy, SaveLatent) and EditKit interoperate;
* **model space**: ``(raw - shift) * scale`` (0.1159 / 0.3611 for FLUX.1), what the
  transformer is trained on and what samplers work in;
* **pixels**: ``[B,3,H,W]`` in 0..1 here; the VAE itself sees -1..1.

Encoding uses the distribution's mode (deterministic, as ComfyUI does) rather than a sample.
"""

from __future__ import annotations

import torch

from .runtime import Component, Runtime

DEFAULT_SCALE = 0.3611
DEFAULT_SHIFT = 0.1159


def _scale_shift(vae: Component) -> tuple[float, float]:
    config = vae.module.config
    scale = config.get("scaling_factor") or DEFAULT_SCALE
    shift = config.get("shift_factor")
    return float(scale), float(DEFAULT_SHIFT if shift is None else shift)


def raw_to_model(vae: Component, latents: torch.Tensor) -> torch.Tensor:
    scale, shift = _scale_shift(vae)
    return (latents.float() - shift) * scale


def model_to_raw(vae: Component, latents: torch.Tensor) -> torch.Tensor:
    scale, shift = _scale_shift(vae)
    return latents.float() / scale + shift


def _vae_bytes(batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Activation estimate for a FLUX.1 VAE pass (ComfyUI budgets ~2.2 KB per pixel in fp16)."""
    element = torch.tensor([], dtype=dtype).element_size()
    return int(batch * height * width * element * 1100)


@torch.inference_mode()
def encode(vae: Component, pixels: torch.Tensor, runtime: Runtime, chunk: int = 4) -> torch.Tensor:
    """Pixels ``[B,3,H,W]`` in 0..1 → model-space latents ``[B,16,H/8,W/8]`` (float32, runtime device)."""
    b, _, h, w = pixels.shape
    device = runtime.acquire(vae, memory_required=_vae_bytes(min(b, chunk), h, w, vae.dtype))
    out = []
    for start in range(0, b, chunk):
        x = pixels[start:start + chunk].to(device=device, dtype=vae.dtype) * 2.0 - 1.0
        out.append(vae.module.encode(x).latent_dist.mode().float())
    scale, shift = _scale_shift(vae)
    return (torch.cat(out) - shift) * scale


@torch.inference_mode()
def decode(vae: Component, latents: torch.Tensor, runtime: Runtime, chunk: int = 4) -> torch.Tensor:
    """Model-space latents ``[B,16,h,w]`` → pixels ``[B,3,8h,8w]`` in 0..1 (float32, runtime device)."""
    b, _, h, w = latents.shape
    device = runtime.acquire(vae, memory_required=_vae_bytes(min(b, chunk), h * 8, w * 8, vae.dtype))
    scale, shift = _scale_shift(vae)
    out = []
    for start in range(0, b, chunk):
        z = latents[start:start + chunk].to(device=device, dtype=torch.float32) / scale + shift
        image = vae.module.decode(z.to(vae.dtype)).sample
        out.append(((image.float() + 1.0) / 2.0).clamp(0.0, 1.0))
    return torch.cat(out)
