"""ComfyUI's Flux CONDITIONING format, read and written without importing ComfyUI.

A CONDITIONING is a list of ``[tensor, dict]`` pairs; for Flux the tensor holds T5-XXL states
``[B,T,4096]`` and the dict holds ``pooled_output`` (CLIP-L, ``[B,768]``) and optionally
``guidance`` (set by FluxGuidance / CLIPTextEncodeFlux; ``None`` after FluxDisableGuidance).
EditKit's text encoder writes exactly this, and EditKit samplers read what native
CLIPTextEncode, FluxGuidance and ConditioningZeroOut produce.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..core.errors import EditKitError

log = logging.getLogger("EditKit")


@dataclass
class FluxText:
    states: torch.Tensor  # [B,T,D]
    pooled: torch.Tensor  # [B,P]
    guidance: float | None  # None when the conditioning does not set one


def make_conditioning(states: torch.Tensor, pooled: torch.Tensor, guidance: float | None = None) -> list:
    extra = {"pooled_output": pooled}
    if guidance is not None:
        extra["guidance"] = float(guidance)
    return [[states, extra]]


def read_conditioning(
    conditioning, joint_dim: int | None = None, pooled_dim: int | None = None, what: str = "CONDITIONING"
) -> FluxText:
    """Validate a Flux CONDITIONING and return its first entry.

    Only the first entry is used: FLUX.1 samplers take one prompt, and combining entries
    (ConditioningCombine) has no meaning for them. A clear error names what is wrong; ``what``
    names the input in it (e.g. "negative").
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise EditKitError(f"The {what} input is empty. Connect EditKit · Flux Text Encode or CLIPTextEncode.")
    if len(conditioning) > 1:
        log.warning("EditKit: %s has %d entries; FLUX.1 samplers use the first one.", what, len(conditioning))
    states, extra = conditioning[0][0], conditioning[0][1]
    if not torch.is_tensor(states) or states.ndim != 3:
        raise EditKitError(
            f"The {what} does not hold Flux text states [batch, tokens, width]. Encode the prompt with "
            "EditKit · Flux Text Encode, or with CLIPTextEncode fed by a DualCLIPLoader of type 'flux'."
        )
    pooled = extra.get("pooled_output")
    if pooled is None:
        raise EditKitError(
            f"The {what} has no pooled_output (CLIP-L): it is not a FLUX.1 conditioning. Encode the prompt with EditKit · Flux Text Encode, or "
            "with CLIPTextEncode fed by a DualCLIPLoader of type 'flux'."
        )
    if pooled.ndim == 1:
        pooled = pooled.unsqueeze(0)
    if joint_dim is not None and states.shape[-1] != joint_dim:
        raise EditKitError(
            f"The {what} was encoded to width {states.shape[-1]}, but this transformer expects {joint_dim} (T5-XXL). "
            "Encode the prompt with the FLUX.1 text encoders (clip_l + t5xxl)."
        )
    if pooled_dim is not None and pooled.shape[-1] != pooled_dim:
        raise EditKitError(
            f"The {what}'s pooled vector has width {pooled.shape[-1]}, but this transformer expects {pooled_dim} (CLIP-L). "
            "Encode the prompt with the FLUX.1 text encoders (clip_l + t5xxl)."
        )
    guidance = extra.get("guidance")
    return FluxText(states=states, pooled=pooled, guidance=None if guidance is None else float(guidance))


def expand_text(text: FluxText, images: int, per_image: int) -> FluxText:
    """Match the prompt batch to ``images * per_image`` samples (one prompt, or one per image)."""
    total = images * per_image
    b = text.states.shape[0]
    if b == total:
        return text
    if b == 1:
        return FluxText(text.states.expand(total, -1, -1), text.pooled.expand(total, -1), text.guidance)
    if b == images:
        return FluxText(
            text.states.repeat_interleave(per_image, 0), text.pooled.repeat_interleave(per_image, 0), text.guidance
        )
    raise EditKitError(f"The CONDITIONING holds {b} prompts for {images} images. Give one prompt or one per image.")
