"""FLUX.1-Fill inpainting and outpainting.

FLUX.1-Fill's transformer reads 384 features per token: the noisy latent (64), the latent of
the image with the masked area blanked (64) and the pixel mask folded 8x8 into each latent
pixel (256). The mask is binarised at 0.5 for the model, as BFL's and diffusers' Fill code do;
the soft mask is kept for blending the result back into the original, so feathered masks give
seamless edges and pixels outside the mask come back unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from einops import rearrange

from ..core.errors import EditKitError
from ..core.images import check_multiple_of, match_mask_to_images, repeat_batch
from ..core.runtime import Component, Runtime
from . import flow
from . import vae as vae_ops
from .conditioning import FluxText, expand_text

log = logging.getLogger("EditKit")

FILL_IN_FEATURES = 384


@dataclass
class FluxResult:
    images: torch.Tensor  # [B,3,H,W] in 0..1, on the runtime's intermediate device
    latents: torch.Tensor  # [B,16,H/8,W/8] model space, same device


def check_in_features(transformer: Component, expected: int, what: str) -> None:
    found = transformer.module.config.in_channels
    if found != expected:
        hint = {64: "FLUX.1-dev/Kontext-dev (64 features)", 384: "FLUX.1-Fill (384 features)",
                192: "EditKit Kontext-inpaint (192 features)"}.get(found, f"a model with {found} input features")
        raise EditKitError(
            f"{what} needs a transformer with {expected} input features, but '{transformer.name}' is {hint}. "
            "Load the matching model in the loader node."
        )


def fill_condition_tokens(vae: Component, pixels: torch.Tensor, mask: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Fill's conditioning features ``[B,N,320]``: masked-image latent (64) + folded mask (256)."""
    binary = (mask > 0.5).to(pixels.dtype)
    # In the VAE's -1..1 range the masked area becomes 0, i.e. 0.5 grey in 0..1.
    masked = pixels * (1.0 - binary) + 0.5 * binary
    latent = vae_ops.encode(vae, masked, runtime)
    folded = rearrange(binary.to(latent.device), "b 1 (h p) (w q) -> b (p q) h w", p=flow.VAE_SCALE, q=flow.VAE_SCALE)
    return torch.cat([flow.pack(latent), flow.pack(folded.float())], dim=-1)


def _round_pads(size: int, before: int, after: int, multiple: int) -> tuple[int, int]:
    """Grow the padding so ``before + size + after`` is a multiple of ``multiple``.

    The extra pixels go to a side that is already padded (after first), so an image that is
    only extended to the left is not also extended to the right.
    """
    extra = (-(before + size + after)) % multiple
    if after > 0 or before == 0:
        return before, after + extra
    return before + extra, after


def outpaint_canvas(
    pixels: torch.Tensor, left: int, top: int, right: int, bottom: int, feathering: int, multiple: int = 16
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """Extend ``[B,3,H,W]`` pixels and return (canvas, mask ``[B,1,H',W']``, final pads l,t,r,b).

    New pixels repeat the nearest edge (a better start than grey when denoise < 1); the mask
    is 1 on new pixels and ramps down linearly over ``feathering`` pixels into the original
    along each extended side, so the seam is repainted and blended.
    """
    b, _, h, w = pixels.shape
    left, right = _round_pads(w, left, right, multiple)
    top, bottom = _round_pads(h, top, bottom, multiple)
    canvas = torch.nn.functional.pad(pixels, (left, right, top, bottom), mode="replicate")
    height, width = canvas.shape[-2:]
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, -1)
    # Distance of each pixel from the original image's extended edges (inside: >= 0).
    distances = []
    if left:
        distances.append(xs - left)
    if right:
        distances.append((left + w - 1) - xs)
    if top:
        distances.append(ys - top)
    if bottom:
        distances.append((top + h - 1) - ys)
    if not distances:
        mask = torch.zeros(height, width)
    else:
        nearest = torch.stack(torch.broadcast_tensors(*distances)).amin(0)
        if feathering > 0:
            mask = (1.0 - (nearest + 1.0) / (feathering + 1.0)).clamp(0.0, 1.0)
        else:
            mask = torch.zeros_like(nearest)
        mask = torch.where(nearest < 0, torch.ones_like(mask), mask)
    return canvas, mask.expand(b, 1, height, width).clone(), (left, top, right, bottom)


@torch.inference_mode()
def fill(
    transformer: Component,
    vae: Component,
    pixels: torch.Tensor,
    mask: torch.Tensor,
    text: FluxText,
    *,
    steps: int,
    guidance: float,
    seed: int,
    denoise: float,
    per_image: int,
    scheduler_config: dict,
    runtime: Runtime,
) -> FluxResult:
    """Inpaint ``pixels [B,3,H,W]`` (0..1) where ``mask [B|1,1,H,W]`` is 1.

    Returns ``B * per_image`` results: the decoded images blended into the originals with the
    soft mask, and the model-space latents of the raw generation.
    """
    check_in_features(transformer, FILL_IN_FEATURES, "FLUX.1-Fill inpainting")
    _, _, h, w = pixels.shape
    check_multiple_of(h, w, 16)
    mask = match_mask_to_images(mask, pixels)
    images = pixels.shape[0]
    text = expand_text(text, images, per_image)
    pixels = repeat_batch(pixels, per_image)
    mask = repeat_batch(mask, per_image)
    out_device = runtime.intermediate_device

    if not bool((mask > 0).any()):
        log.info("EditKit Fill: the mask is empty, returning the input unchanged (no sampling).")
        latents = vae_ops.encode(vae, pixels, runtime)
        return FluxResult(pixels.to(out_device), latents.to(out_device))

    cond = fill_condition_tokens(vae, pixels, mask, runtime)
    lh, lw = h // flow.VAE_SCALE, w // flow.VAE_SCALE
    init = flow.pack(vae_ops.encode(vae, pixels, runtime)) if denoise < 1.0 else None
    noise = flow.pack(flow.noise_like((pixels.shape[0], flow.LATENT_CHANNELS, lh, lw), seed))
    schedule = flow.flux_schedule(steps, noise.shape[1], scheduler_config, denoise)
    inputs = flow.FlowInputs(
        noise=noise, text=text.states, pooled=text.pooled, guidance=guidance, latent_h=lh, latent_w=lw,
        cond=cond, init=init,
    )
    tokens = flow.denoise(transformer, inputs, schedule, runtime)
    latents = flow.unpack(tokens, lh, lw)
    decoded = vae_ops.decode(vae, latents, runtime)
    soft = mask.to(decoded.device)
    blended = pixels.to(decoded.device) * (1.0 - soft) + decoded * soft
    return FluxResult(blended.to(out_device), latents.to(out_device))
