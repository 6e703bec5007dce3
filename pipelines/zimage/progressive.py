"""One Z-Image sampling stage, and the progressive recipe as a chain of them.

:func:`sample_stage` is what EditKit · Z-Image Sampler runs (raw LATENT in, raw LATENT out), and
:func:`run_progressive` chains exactly that call with ComfyUI's latent resize in between, so the
one-node recipe equals the modular graph of samplers and native LatentUpscale nodes bit for bit.
The prompt is encoded once by the caller; between stages nothing is decoded or re-encoded and
the transformer stays where it is. Stage ``k`` (0-based) draws its noise from ``seed + k``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core import sampling as core
from ..core.images import repeat_batch
from ..core.runtime import Component, Progress, Runtime
from ..flux import vae as vae_ops
from ..flux.vae import FLUX_LATENT
from .latents import upscale_raw
from .recipe import Recipe
from .sampler import LATENT_CHANNELS, VAE_SCALE, check_size, sample, zimage_schedule
from .text import expand_prompts


def sample_stage(
    transformer: Component,
    vae: Component,
    scheduler_config: dict,
    captions: list[torch.Tensor],
    negative: list[torch.Tensor] | None,
    runtime: Runtime,
    *,
    width: int,
    height: int,
    seed: int,
    steps: int,
    cfg: float = 1.0,
    sampler: str = "euler",
    shift: float | None = None,
    denoise: float = 1.0,
    convention: str = "denoise",
    batch_size: int = 1,
    init_raw: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Text-to-image (no ``init_raw``) or img2img from a raw latent; returns the raw latent (float32).

    With ``init_raw`` ``[B,16,h,w]`` the size comes from it and each of its latents yields
    ``batch_size`` results; ``width``/``height`` are used only without it.
    """
    if init_raw is None:
        check_size(width, height)
        n, h, w = batch_size, height // VAE_SCALE, width // VAE_SCALE
        init = None
    else:
        init_raw = repeat_batch(init_raw, batch_size)
        n, _, h, w = init_raw.shape
        check_size(w * VAE_SCALE, h * VAE_SCALE, "The latent's picture size")
        init = vae_ops.raw_to_model(vae, init_raw)
    schedule = zimage_schedule(scheduler_config, steps, shift=shift, denoise=denoise, convention=convention)
    noise = core.seeded_noise((n, LATENT_CHANNELS, h, w), seed)
    settings = core.SamplerSettings(name=sampler, seed=seed)
    x = sample(
        transformer, expand_prompts(captions, n), noise, schedule, runtime, init=init,
        negative=None if negative is None else expand_prompts(negative, n, "negative"), cfg=cfg, sampler=settings,
        progress=progress,
    )
    return vae_ops.model_to_raw(vae, x)


@dataclass
class StageReport:
    name: str
    width: int
    height: int
    model_calls: int  # per sample and branch
    token_steps: int  # image tokens x model calls x CFG branches x batch
    seconds: float


@dataclass
class ProgressiveResult:
    latent: torch.Tensor  # final raw latent [B,16,h,w], float32
    image: torch.Tensor  # [B,3,H,W] in 0..1
    stage_latents: list[torch.Tensor] = field(default_factory=list)
    stage_images: torch.Tensor | None = None  # [stages*B,3,H,W], every stage resized to the final size
    reports: list[StageReport] = field(default_factory=list)
    decode_seconds: float = 0.0


def run_progressive(
    transformer: Component,
    vae: Component,
    scheduler_config: dict,
    captions: list[torch.Tensor],
    negative: list[torch.Tensor] | None,
    recipe: Recipe,
    seed: int,
    runtime: Runtime,
    *,
    batch_size: int = 1,
    upscale_method: str = "nearest-exact",
    decode_stages: bool = False,
    progress: Progress | None = None,
) -> ProgressiveResult:
    """Run every stage of ``recipe`` (already validated), then decode the final latent once."""
    total = sum(recipe.model_calls(s) for s in recipe.stages)
    progress = progress if progress is not None else runtime.progress(total, FLUX_LATENT.preview)
    raw = None
    latents, reports = [], []
    for k, stage in enumerate(recipe.stages):
        start = time.perf_counter()
        if raw is not None:
            raw = upscale_raw(raw, stage.width, stage.height, upscale_method)
        raw = sample_stage(
            transformer, vae, scheduler_config, captions, negative, runtime, width=stage.width, height=stage.height,
            seed=seed + k, steps=stage.steps, cfg=stage.cfg, sampler=stage.sampler, shift=recipe.shift,
            denoise=stage.strength or 1.0, convention=recipe.convention, batch_size=batch_size if raw is None else 1,
            init_raw=raw, progress=progress,
        )
        latents.append(raw)
        branches = 2 if (negative is not None and stage.cfg != 1.0) else 1
        calls = recipe.model_calls(stage)
        reports.append(StageReport(stage.name, stage.width, stage.height, calls,
                                   stage.tokens * calls * branches * raw.shape[0], time.perf_counter() - start))
    start = time.perf_counter()
    image = vae_ops.decode(vae, vae_ops.raw_to_model(vae, raw), runtime)
    decode_seconds = time.perf_counter() - start
    stage_images = None
    if decode_stages:
        size = tuple(image.shape[-2:])
        pictures = [vae_ops.decode(vae, vae_ops.raw_to_model(vae, r), runtime) for r in latents[:-1]]
        stage_images = torch.cat([F.interpolate(p, size=size, mode="nearest-exact") for p in pictures] + [image])
    return ProgressiveResult(raw, image, latents, stage_images, reports, decode_seconds)
