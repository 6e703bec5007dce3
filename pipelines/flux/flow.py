"""FLUX.1 flow-matching sampling shared by every EditKit Flux sampler.

The FLUX.1 transformer sees the image as a sequence of 2x2 latent patches ("tokens"), each
with ``4 * C`` features, channel-major (feature = c*4 + py*2 + px), which is the packing of
BFL's reference code, diffusers' pipelines and ComfyUI alike. Conditioning such as Fill's
masked image or Kontext-inpaint's source and mask-image latents is concatenated to the noisy
tokens along the feature axis; Kontext-style references are appended along the sequence axis
with position index 1. :func:`denoise` runs the Euler loop over such inputs.

The sigma schedule comes from diffusers' ``FlowMatchEulerDiscreteScheduler`` (so the
resolution-dependent shift is exactly FLUX's); the loop itself does the one-line Euler update
with precomputed step sizes, so it never looks up scheduler state or syncs the GPU per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from einops import rearrange

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


@dataclass(frozen=True)
class Schedule:
    """Sigmas from noisiest to 0 (``len == steps + 1``) and the matching model timesteps."""

    sigmas: torch.Tensor  # float32, CPU
    timesteps: torch.Tensor  # float32, CPU; what the transformer receives (sigma in 0..1 units)

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def flux_schedule(steps: int, image_seq_len: int, scheduler_config: dict, denoise: float = 1.0) -> Schedule:
    """FLUX.1's shifted schedule for ``steps`` model calls.

    ``denoise`` < 1 follows ComfyUI's KSampler: build the schedule for ``steps / denoise``
    steps and run only its last ``steps`` (so ``steps`` is always the number of model calls
    and the run starts at a lower noise level).
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if not 0.0 < denoise <= 1.0:
        raise ValueError("denoise must be in (0, 1]")
    total = steps if denoise >= 1.0 else max(steps, int(steps / denoise))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / total, total), mu=mu, device="cpu")
    sigmas = scheduler.sigmas.float()[-(steps + 1):]
    timesteps = (scheduler.timesteps.float() / scheduler.config.num_train_timesteps)[-steps:]
    return Schedule(sigmas=sigmas, timesteps=timesteps)


def noise_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise from ``seed`` on the CPU, in float32.

    Generated on the CPU like ComfyUI does, so a seed gives the same picture on any GPU.
    """
    generator = torch.Generator("cpu").manual_seed(int(seed) % (2**64))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def flux_activation_bytes(batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Working memory estimate for one FLUX.1 forward, from ComfyUI's own Flux estimate.

    ComfyUI budgets ``B * (H/8) * (W/8) * dtype_size * 0.01 * 3.1`` MiB; one token is 4 latent
    pixels. Passed to the memory manager so it evicts enough before loading.
    """
    element = torch.tensor([], dtype=dtype).element_size()
    return int(batch * tokens * 4 * element * 0.01 * 3.1 * 1024 * 1024)


@dataclass
class FlowInputs:
    """Everything one Euler run needs, already packed. Tensors may live on any device."""

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


@torch.inference_mode()
def denoise(
    transformer: Component,
    inputs: FlowInputs,
    schedule: Schedule,
    runtime: Runtime,
    progress=None,
) -> torch.Tensor:
    """Run the Euler loop and return the clean packed latent ``[B,N,64]`` in float32 (on the device).

    The running latent is kept in float32 and cast to the model dtype only as transformer
    input. Per step the loop does one transformer call, one fused update and, only when the host
    shows previews, an x0 estimate for the preview.
    """
    batch, tokens, _ = inputs.noise.shape
    model = transformer.module
    dtype = transformer.dtype
    device = runtime.acquire(transformer, memory_required=flux_activation_bytes(batch, tokens, dtype))

    def dev(t: torch.Tensor | None, to_dtype=dtype):
        return None if t is None else t.to(device=device, dtype=to_dtype, non_blocking=True)

    x = dev(inputs.noise, torch.float32)
    start = float(schedule.sigmas[0])
    if inputs.init is not None and start < 1.0:
        x = start * x + (1.0 - start) * dev(inputs.init, torch.float32)
    cond = dev(inputs.cond)
    text = dev(inputs.text)
    pooled = dev(inputs.pooled)
    img_ids = token_ids(inputs.latent_h, inputs.latent_w, 0, device)
    refs = dev(inputs.ref_tokens)
    if refs is not None:
        img_ids = torch.cat([img_ids, inputs.ref_ids.to(device)], dim=0)
    txt_ids = text_ids(text.shape[1], device)
    guidance = None
    if model.config.guidance_embeds:
        guidance = torch.full((batch,), float(inputs.guidance), device=device, dtype=torch.float32)
    timesteps = schedule.timesteps.to(device=device, dtype=dtype)
    sigmas = schedule.sigmas.tolist()
    dts = (schedule.sigmas[1:] - schedule.sigmas[:-1]).tolist()
    progress = progress if progress is not None else runtime.progress(schedule.steps)

    for i in range(schedule.steps):
        runtime.check_interrupt()
        hidden = x.to(dtype)
        if cond is not None:
            hidden = torch.cat([hidden, cond], dim=-1)
        if refs is not None:
            hidden = torch.cat([hidden, refs], dim=1)
        velocity = model(
            hidden_states=hidden,
            timestep=timesteps[i].expand(batch),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        if refs is not None:
            velocity = velocity[:, :tokens]
        velocity = velocity.float()

        def preview(x=x, v=velocity, s=sigmas[i]):  # ComfyUI previews the first sample only
            return unpack(x[:1] - s * v[:1], inputs.latent_h, inputs.latent_w)

        x = x + dts[i] * velocity
        progress.update(preview=preview)
    return x
