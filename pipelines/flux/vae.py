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

import contextlib
import logging

import torch

from ..core.errors import EditKitError
from ..core.latent_format import LatentFormat
from ..core.runtime import Component, Runtime

log = logging.getLogger("EditKit")

# FLUX.1's latent format (also Z-Image's, which uses the FLUX.1 VAE).
FLUX_LATENT = LatentFormat(channels=16, spatial=8, scale=0.3611, shift=0.1159, preview="Flux")


def latent_format(vae: Component) -> LatentFormat:
    """FLUX.1's format, with the scale/shift a VAE's own config states (a diffusers folder may say so)."""
    config = vae.module.config
    scale, shift = config.get("scaling_factor"), config.get("shift_factor")
    if (scale is None or scale == FLUX_LATENT.scale) and (shift is None or shift == FLUX_LATENT.shift):
        return FLUX_LATENT
    return LatentFormat(16, 8, float(scale or FLUX_LATENT.scale),
                        float(FLUX_LATENT.shift if shift is None else shift), "Flux")


def _scale_shift(vae: Component) -> tuple[float, float]:
    fmt = latent_format(vae)
    return float(fmt.scale), float(fmt.shift)


def read_latent(samples: torch.Tensor, what: str = "latent") -> torch.Tensor:
    """A LATENT's samples checked to be FLUX.1-VAE latents ``[B,16,h,w]`` (FLUX.1 and Z-Image), else a clear error."""
    if samples.ndim != 4 or samples.shape[1] != FLUX_LATENT.channels:
        other = " (a Qwen-Image / Wan latent)" if samples.ndim == 5 else ""
        raise EditKitError(
            f"The {what} has shape {tuple(samples.shape)}{other}; this model needs a 16-channel FLUX.1-VAE latent "
            "[batch, 16, height/8, width/8]. Encode the picture with the FLUX.1 VAE (ae.safetensors), or decode "
            "a latent of another model with its own VAE first."
        )
    return samples


def raw_to_model(vae: Component, latents: torch.Tensor) -> torch.Tensor:
    return latent_format(vae).to_model(latents)


def model_to_raw(vae: Component, latents: torch.Tensor) -> torch.Tensor:
    return latent_format(vae).to_raw(latents)


# ComfyUI's own budgets for the FLUX.1 VAE, in values per pixel (times the dtype size).
_ENCODE_PER_PIXEL = 1767
_DECODE_PER_PIXEL = 2178
# Tile size (pixels) for the retry after running out of memory.
_TILE_PIXELS = 512


def _bytes(per_pixel: int, batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    return int(batch * height * width * per_pixel * torch.tensor([], dtype=dtype).element_size())


@contextlib.contextmanager
def _tiled(vae: Component):
    """Temporarily process in overlapping 512-pixel tiles with diffusers' own tiling.

    ``enable_tiling`` takes no tile size in diffusers 0.42.1, so the smaller tile (the default is the
    sample size, 1024 px for FLUX's VAE) is set on the attributes it reads; both are restored after.
    """
    module = vae.module
    saved = (module.use_tiling, module.tile_sample_min_size, module.tile_latent_min_size)
    module.enable_tiling()
    module.tile_sample_min_size, module.tile_latent_min_size = _TILE_PIXELS, _TILE_PIXELS // 8
    try:
        yield
    finally:
        module.use_tiling, module.tile_sample_min_size, module.tile_latent_min_size = saved


def _in_chunks(vae: Component, run, batch: int, chunk: int, runtime: Runtime) -> torch.Tensor:
    """Run ``run(start, stop)`` over the batch; after an out-of-memory error retry one by one, tiled.

    Like ComfyUI's own VAE nodes, a picture too large for the free memory still decodes (slower)
    instead of failing.
    """
    try:
        return torch.cat([run(start, min(start + chunk, batch)) for start in range(0, batch, chunk)])
    except torch.OutOfMemoryError:
        log.warning("EditKit: out of memory in the VAE; retrying in %d-pixel tiles.", _TILE_PIXELS)
    runtime.empty_cache()
    with _tiled(vae):
        return torch.cat([run(start, start + 1) for start in range(batch)])


@torch.inference_mode()
def encode(vae: Component, pixels: torch.Tensor, runtime: Runtime, chunk: int = 4) -> torch.Tensor:
    """Pixels ``[B,3,H,W]`` in 0..1 → model-space latents ``[B,16,H/8,W/8]`` (float32, runtime device)."""
    b, _, h, w = pixels.shape
    device = runtime.acquire(vae, memory_required=_bytes(_ENCODE_PER_PIXEL, min(b, chunk), h, w, vae.dtype))
    scale, shift = _scale_shift(vae)

    def run(start: int, stop: int) -> torch.Tensor:
        x = pixels[start:stop].to(device=device, dtype=vae.dtype) * 2.0 - 1.0
        return vae.module.encode(x).latent_dist.mode().float()

    return (_in_chunks(vae, run, b, chunk, runtime) - shift) * scale


@torch.inference_mode()
def decode(vae: Component, latents: torch.Tensor, runtime: Runtime, chunk: int = 4) -> torch.Tensor:
    """Model-space latents ``[B,16,h,w]`` → pixels ``[B,3,8h,8w]`` in 0..1 (float32, runtime device)."""
    b, _, h, w = latents.shape
    device = runtime.acquire(vae, memory_required=_bytes(_DECODE_PER_PIXEL, min(b, chunk), h * 8, w * 8, vae.dtype))
    scale, shift = _scale_shift(vae)

    def run(start: int, stop: int) -> torch.Tensor:
        z = latents[start:stop].to(device=device, dtype=torch.float32) / scale + shift
        image = vae.module.decode(z.to(vae.dtype)).sample
        return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    return _in_chunks(vae, run, b, chunk, runtime)
