"""Sampling the 192-feature Kontext-inpaint transformer: single edits and multi-round edits.

Everything works in model-space latents so that rounds chain without a VAE decode/encode in
between (which would add VAE loss at every round). Optional Kontext-style references are
appended as extra tokens (their packed latent in features 0:64, zeros in 64:192, position
ids ``(1, row, col)`` for every reference, as the design contract and diffusers' Kontext
pipeline use; ComfyUI's default instead offsets each reference spatially) whose predictions
are dropped; they are off unless connected, because the untrained widening never saw them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.errors import EditKitError
from ...core.runtime import Component, Runtime
from .. import flow
from ..conditioning import FluxText
from ..fill import check_in_features
from .conditioning import condition_tokens
from .widen import KONTEXT_IN_FEATURES


@dataclass
class EditResult:
    latents: torch.Tensor  # [B,16,h,w] model space


def round_seed(seed: int, round_index: int) -> int:
    """Seed of round ``round_index`` (0-based) in a multi-round edit: ``seed + round_index``.

    Documented and public so a chain of single edits can reproduce a multi-round run exactly.
    """
    return (int(seed) + round_index) % (2**64)


# Position index (first id component) of every reference token; the target's tokens use 0.
REFERENCE_INDEX = 1


def _reference_tokens(references: list[torch.Tensor], batch: int, cond_features: int):
    """Reference tokens ``[B,R,64+F]`` and their ids ``[R,3]``: ``(1, row, col)`` for each reference."""
    tokens, ids = [], []
    for ref in references:
        _, _, rh, rw = ref.shape
        if rh % 2 or rw % 2:
            raise EditKitError("Reference images must be multiples of 16 pixels wide and high.")
        packed = flow.pack(ref.float())
        if packed.shape[0] not in (1, batch):
            raise EditKitError(f"Got {packed.shape[0]} reference images for {batch} edits; give one or one per edit.")
        packed = packed.expand(batch, -1, -1)
        tokens.append(torch.cat([packed, packed.new_zeros(*packed.shape[:2], cond_features)], dim=-1))
        ids.append(flow.token_ids(rh, rw, REFERENCE_INDEX))
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)


@torch.inference_mode()
def edit(
    transformer: Component,
    source_latent: torch.Tensor,
    mask_latent: torch.Tensor,
    text: FluxText,
    *,
    steps: int,
    guidance: float,
    seed: int,
    denoise: float,
    scheduler_config: dict,
    runtime: Runtime,
    references: list[torch.Tensor] | None = None,
    progress=None,
) -> EditResult:
    """One Kontext-inpaint edit of model-space ``source_latent [B,16,h,w]``.

    ``mask_latent`` is the model-space latent of the mask picture (``[B|1,16,h,w]``); ``text``
    must hold B prompts or one. Returns the edited model-space latents on the intermediate device.
    """
    check_in_features(transformer, KONTEXT_IN_FEATURES, "Kontext-inpaint editing")
    b, _, h, w = source_latent.shape
    if h % 2 or w % 2:
        raise EditKitError(f"Source is {w * 8}x{h * 8}; Kontext-inpaint needs multiples of 16 pixels.")
    if mask_latent.shape[-2:] != (h, w):
        raise EditKitError(
            "The mask's size does not match the source's. Give a mask of the source picture's size, or none."
        )
    # The source may be a CPU LATENT (a previous edit) while the mask latent was just encoded on the GPU:
    # bring the source to the mask latent's device (on the way to the transformer anyway).
    cond = condition_tokens(source_latent.to(mask_latent.device), mask_latent.expand(b, -1, -1, -1))
    noise = flow.pack(flow.noise_like((b, flow.LATENT_CHANNELS, h, w), seed))
    init = flow.pack(source_latent.float()) if denoise < 1.0 else None
    ref_tokens = ref_ids = None
    if references:
        ref_tokens, ref_ids = _reference_tokens(references, b, cond.shape[-1])
    states, pooled = text.states, text.pooled
    if states.shape[0] != b:
        if states.shape[0] != 1:
            raise EditKitError(f"Got {states.shape[0]} prompts for {b} edits; give one prompt or one per edit.")
        states, pooled = states.expand(b, -1, -1), pooled.expand(b, -1)
    schedule = flow.flux_schedule(steps, noise.shape[1], scheduler_config, denoise)
    inputs = flow.FlowInputs(
        noise=noise, text=states, pooled=pooled, guidance=guidance, latent_h=h, latent_w=w,
        cond=cond, init=init, ref_tokens=ref_tokens, ref_ids=ref_ids,
    )
    tokens = flow.denoise(transformer, inputs, schedule, runtime, progress=progress)
    return EditResult(flow.unpack(tokens, h, w).to(runtime.intermediate_device))


@torch.inference_mode()
def multi_round(
    transformer: Component,
    source_latent: torch.Tensor,
    mask_latent: torch.Tensor,
    texts: list[FluxText],
    *,
    steps: int,
    guidance: float,
    seed: int,
    denoise: float,
    scheduler_config: dict,
    runtime: Runtime,
    references: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Run one edit per prompt, each on the previous round's output latent.

    Round k uses seed :func:`round_seed` (seed, k); the mask picture and references stay fixed.
    Returns the model-space latents of every round. Progress spans all rounds.
    """
    if not texts:
        raise EditKitError("No instructions: write one edit instruction per line.")
    progress = runtime.progress(steps * len(texts))
    history, current = [], source_latent
    for k, text in enumerate(texts):
        current = edit(
            transformer, current, mask_latent, text, steps=steps, guidance=guidance, seed=round_seed(seed, k),
            denoise=denoise, scheduler_config=scheduler_config, runtime=runtime, references=references,
            progress=progress,
        ).latents
        history.append(current)
    return history
