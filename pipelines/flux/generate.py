"""FLUX.1-dev / FLUX.1-schnell generation: text-to-image and image-to-image on the sampling core.

Any 64-feature Flux transformer works (dev, schnell, fine-tunes, GGUF). Guidance-distilled
models read ``guidance`` through their guidance embedding; a negative prompt turns on true CFG
(``uncond + s * (cond - uncond)``, FluxPipeline's ``true_cfg_scale``), which doubles the cost
of a step and is off unless asked for. Image-to-image starts from the VAE mode of the picture
(deterministic, as ComfyUI encodes) or from a LATENT; the two denoise conventions of the
core are both available, KSampler's ``denoise`` being the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import sampling as core
from ..core.errors import EditKitError
from ..core.runtime import Component, Runtime
from . import flow
from . import vae as vae_ops
from .conditioning import FluxText, expand_text
from .fill import FluxResult, check_in_features

DEV_IN_FEATURES = 64
SIZE_MULTIPLE = 16
# FLUX.1-schnell's published scheduler: a static shift of 1 (no resolution-dependent shift).
SCHNELL_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                     "use_dynamic_shifting": False}


def schedule_config_for(transformer: Component, scheduler_config: dict) -> dict:
    """The scheduler config to sample ``transformer`` with.

    A transformer without a guidance embedding is FLUX.1-schnell (timestep-distilled). Loaded from
    single files it arrives with the shipped FLUX.1-dev config, whose resolution shift schnell was
    not trained with; schnell's own static shift of 1 is used then. A diffusers folder's config is
    always kept.
    """
    if not transformer.module.config.guidance_embeds and scheduler_config.get("use_dynamic_shifting"):
        return SCHNELL_SCHEDULER
    return scheduler_config


def check_size(width: int, height: int) -> None:
    """FLUX.1 packs 2x2 latent pixels of 8x8 pixels each: sizes must be multiples of 16."""
    bad = [(name, v) for name, v in (("width", width), ("height", height)) if v % SIZE_MULTIPLE or v <= 0]
    if bad:
        hints = ", ".join(
            f"{name} {v} → {max(SIZE_MULTIPLE, round(v / SIZE_MULTIPLE) * SIZE_MULTIPLE)}" for name, v in bad
        )
        raise EditKitError(f"FLUX.1 needs width and height in multiples of 16 pixels; nearest valid: {hints}.")


@dataclass(frozen=True)
class GenerateSettings:
    steps: int = 28
    guidance: float = 3.5
    seed: int = 0
    denoise: float = 1.0
    convention: str = "denoise"
    sampler: core.SamplerSettings = core.SamplerSettings()
    cfg_scale: float = 1.0  # true CFG; used only with a negative prompt


@torch.inference_mode()
def generate(
    transformer: Component,
    vae: Component,
    text: FluxText,
    *,
    width: int,
    height: int,
    settings: GenerateSettings,
    scheduler_config: dict,
    runtime: Runtime,
    negative: FluxText | None = None,
    init_latents: torch.Tensor | None = None,
    per_start: int = 1,
) -> FluxResult:
    """Generate ``per_start`` pictures per starting latent (or ``per_start`` from noise).

    ``init_latents`` are model-space ``[B,16,h,w]``; with them, ``width``/``height`` are ignored
    and the output has their size. Returns decoded pictures and model-space latents on the
    runtime's intermediate device.
    """
    check_in_features(transformer, DEV_IN_FEATURES, "EditKit · Flux Sampler (FLUX.1-dev text/image-to-image)")
    core.check_partial(settings.denoise, settings.convention)
    if init_latents is not None:
        starts, _, lh, lw = init_latents.shape
        if lh % 2 or lw % 2:
            raise EditKitError(
                f"The starting picture is {lw * 8}x{lh * 8}; FLUX.1 needs multiples of 16 pixels. Resize or crop it."
            )
    else:
        check_size(width, height)
        starts, lh, lw = 1, height // 8, width // 8
    total = starts * per_start
    text = expand_text(text, starts, per_start)
    if negative is not None:
        negative = expand_text(negative, starts, per_start)
    noise = flow.pack(core.seeded_noise((total, flow.LATENT_CHANNELS, lh, lw), settings.seed))
    init = None
    if init_latents is not None:
        init = flow.pack(init_latents.float().repeat_interleave(per_start, 0))
    schedule = flow.flux_schedule(
        settings.steps, noise.shape[1], schedule_config_for(transformer, scheduler_config), settings.denoise,
        settings.convention,
    )
    inputs = flow.FlowInputs(
        noise=noise, text=text.states, pooled=text.pooled, guidance=settings.guidance, latent_h=lh, latent_w=lw,
        init=init,
        negative_text=None if negative is None else negative.states,
        negative_pooled=None if negative is None else negative.pooled,
    )
    sampler = core.SamplerSettings(settings.sampler.name, settings.sampler.eta, settings.sampler.s_noise,
                                   settings.seed)
    tokens = flow.denoise(transformer, inputs, schedule, runtime, sampler=sampler, cfg_scale=settings.cfg_scale)
    latents = flow.unpack(tokens, lh, lw)
    images = vae_ops.decode(vae, latents, runtime)
    out = runtime.intermediate_device
    return FluxResult(images.to(out), latents.to(out))
