"""FLUX.1 on the shared sampling core: token packing, position ids, the shifted schedule, the model call.

The FLUX.1 transformer sees the image as a sequence of 2x2 latent patches ("tokens"), each
with ``4 * C`` features, channel-major (feature = c*4 + py*2 + px), which is the packing of
BFL's reference code, diffusers' pipelines and ComfyUI alike. Conditioning such as Fill's
masked image or Kontext-inpaint's source and mask-image latents is concatenated to the noisy
tokens along the feature axis; Kontext-style references are appended along the sequence axis
with position index 1. :func:`denoise` builds the Flux prediction function over such inputs
and hands it to :func:`..core.sampling.sample`, which owns the loop, the sampler and CFG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from ..core import sampling as core
from ..core.lora import applies_loras
from ..core.runtime import Component, Runtime

LATENT_CHANNELS = 16
VAE_SCALE = 8  # pixels per latent pixel
PATCH = 2  # latent pixels per token side


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W]`` latents → ``[B,(H/2)(W/2),4C]`` tokens."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpack(tokens: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a ``latent_h x latent_w`` latent."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=latent_h // PATCH, ph=PATCH, pw=PATCH)


def token_ids(latent_h: int, latent_w: int, index: int = 0, device=None) -> torch.Tensor:
    """Position ids ``(index, row, col)`` per token; index 0 = target, 1 = Kontext reference."""
    rows = torch.arange(latent_h // PATCH, device=device, dtype=torch.float32)
    cols = torch.arange(latent_w // PATCH, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.full_like(grid[:, :1], float(index)), grid], dim=-1)


def text_ids(length: int, device=None) -> torch.Tensor:
    return torch.zeros(length, 3, device=device, dtype=torch.float32)


Schedule = core.Schedule


def flux_schedule(
    steps: int, image_seq_len: int, scheduler_config: dict, denoise: float = 1.0, convention: str = "denoise"
) -> Schedule:
    """FLUX.1's resolution-shifted schedule for ``steps`` (see the core's denoise conventions)."""
    return core.flow_schedule(
        scheduler_config, steps, image_seq_len=image_seq_len, denoise=denoise, convention=convention
    )


def noise_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial noise: the CPU ``torch.randn`` of the unpacked latent shape from ``seed``."""
    return core.seeded_noise(shape, seed)


def flux_activation_bytes(batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Working memory estimate for one FLUX.1 forward, from ComfyUI's own Flux estimate.

    ComfyUI budgets ``B * (H/8) * (W/8) * dtype_size * 0.01 * 3.1`` MiB; one token is 4 latent
    pixels. Passed to the memory manager so it evicts enough before loading.
    """
    element = torch.tensor([], dtype=dtype).element_size()
    return int(batch * tokens * 4 * element * 0.01 * 3.1 * 1024 * 1024)


@dataclass
class FlowInputs:
    """Everything one Flux run needs, already packed. Tensors may live on any device."""

    noise: torch.Tensor  # [B,N,64] packed noise
    text: torch.Tensor  # [B,T,joint_dim] T5 states
    pooled: torch.Tensor  # [B,pooled_dim] CLIP pooled output
    guidance: float
    latent_h: int
    latent_w: int
    cond: torch.Tensor | None = None  # [B,N,F] features appended to every target token
    init: torch.Tensor | None = None  # [B,N,64] clean tokens to start from when denoise < 1
    ref_tokens: torch.Tensor | None = None  # [B,R,64+F] reference tokens (zeros in the cond features)
    ref_ids: torch.Tensor | None = None  # [R,3] their position ids (index 1)
    negative_text: torch.Tensor | None = None  # [B,T',joint_dim] for true CFG (FluxPipeline's true_cfg_scale)
    negative_pooled: torch.Tensor | None = None


@torch.inference_mode()
@applies_loras  # a LoRA'd transformer runs with its LoRAs for this call only (core.lora)
def denoise(
    transformer: Component,
    inputs: FlowInputs,
    schedule: Schedule,
    runtime: Runtime,
    progress=None,
    sampler: core.SamplerSettings | None = None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Sample and return the clean packed latent ``[B,N,64]`` in float32 (on the device).

    The transformer input is cast to the model dtype per call; the running latent stays
    float32 inside the core. ``cfg_scale`` > 1 with ``negative_text`` runs true CFG (plain
    ``uncond + s * (cond - uncond)``, as FluxPipeline's ``true_cfg_scale``); guidance-distilled
    models keep their guidance embedding in both branches.
    """
    batch, tokens, _ = inputs.noise.shape
    model = transformer.module
    dtype = transformer.dtype
    use_cfg = inputs.negative_text is not None and cfg_scale != 1.0
    batched = use_cfg and inputs.negative_text.shape[1] == inputs.text.shape[1]
    calls = 2 if batched else 1
    device = runtime.acquire(transformer, memory_required=flux_activation_bytes(batch * calls, tokens, dtype))

    def dev(t: torch.Tensor | None, to_dtype=dtype):
        return None if t is None else t.to(device=device, dtype=to_dtype, non_blocking=True)

    cond = dev(inputs.cond)
    img_ids = token_ids(inputs.latent_h, inputs.latent_w, 0, device)
    refs = dev(inputs.ref_tokens)
    if refs is not None:
        img_ids = torch.cat([img_ids, inputs.ref_ids.to(device)], dim=0)
    texts = {"cond": (dev(inputs.text), dev(inputs.pooled))}
    if use_cfg:
        texts["uncond"] = (dev(inputs.negative_text), dev(inputs.negative_pooled))
    txt_ids = text_ids(inputs.text.shape[1], device)
    neg_txt_ids = text_ids(inputs.negative_text.shape[1], device) if use_cfg else None
    guidance_value = float(inputs.guidance)
    with_guidance = bool(model.config.guidance_embeds)
    timesteps = schedule.timesteps.to(device=device, dtype=dtype)
    extra_cache: dict[tuple, tuple] = {}

    def extras(branches: tuple) -> tuple:
        """Per-branch-combination inputs that do not change over the steps, built once."""
        found = extra_cache.get(branches)
        if found is None:
            text = torch.cat([texts[b][0] for b in branches])
            pooled = torch.cat([texts[b][1] for b in branches])
            n = batch * len(branches)
            hint = torch.full((n,), guidance_value, device=device, dtype=torch.float32) if with_guidance else None
            c = None if cond is None else cond.repeat(len(branches), 1, 1)
            r = None if refs is None else refs.repeat(len(branches), 1, 1)
            ids = neg_txt_ids if branches == ("uncond",) else txt_ids
            found = extra_cache[branches] = (text, pooled, hint, c, r, ids, n)
        return found

    def predict(x: torch.Tensor, i: int, branches: tuple) -> torch.Tensor:
        text, pooled, hint, c, r, ids, n = extras(branches)
        hidden = x.to(dtype)
        if c is not None:
            hidden = torch.cat([hidden, c], dim=-1)
        if r is not None:
            hidden = torch.cat([hidden, r], dim=1)
        velocity = model(
            hidden_states=hidden,
            timestep=timesteps[i].expand(n),
            guidance=hint,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return velocity[:, :tokens] if r is not None else velocity

    def preview_of(x0: torch.Tensor) -> torch.Tensor:
        return unpack(x0, inputs.latent_h, inputs.latent_w)

    noise = dev(inputs.noise, torch.float32)
    init = dev(inputs.init, torch.float32)
    lh, lw = inputs.latent_h, inputs.latent_w
    return core.sample(
        predict, noise, schedule, runtime, init=init, sampler=sampler or core.SamplerSettings(),
        guidance=core.Guidance(scale=cfg_scale, enabled=use_cfg, batched=batched),
        noise_shape=(batch, LATENT_CHANNELS, lh, lw), to_sampler_layout=pack,
        preview_of=preview_of, progress=progress,
    )
