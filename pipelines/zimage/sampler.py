"""Z-Image on the shared sampling core: its schedule, its model call and its guidance scale.

What differs from FLUX.1 is all here, on the family side of the core:

* the transformer reads the latent unpacked (``[C,1,H,W]`` per sample, it patchifies itself)
  and one caption tensor per sample (each prompt keeps its own length, no padding);
* its timestep is ``(1000 - t) / 1000`` (0 = pure noise) and it predicts the *negated*
  velocity, so :func:`predictor` negates its output before handing it to the core;
* the schedule is ``linspace(1, 1/N, N)`` in float32 with a static shift (3.0 for Turbo);
* diffusers' Z-Image guidance is ``pos + g * (pos - neg)`` (0 = off) where EditKit, like
  ComfyUI, uses ``neg + cfg * (pos - neg)`` (1 = off): the same thing with ``cfg = g + 1``
  (:func:`cfg_from_diffusers`).

The running latent is in the FLUX.1 VAE's model space (``(raw - 0.1159) * 0.3611``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..core import sampling as core
from ..core.errors import EditKitError
from ..core.lora import applies_loras
from ..core.runtime import Component, Runtime
from ..flux.vae import FLUX_LATENT

LATENT_CHANNELS = 16
VAE_SCALE = 8  # pixels per latent pixel
SIZE_MULTIPLE = 16  # pixels: 2x2 latent patches of 8x8 pixels


def zimage_sigmas(total: int) -> np.ndarray:
    """``torch.linspace(1, 1/N, N)`` in float32, the unshifted sigmas ZImagePipeline passes."""
    return torch.linspace(1.0, 1.0 / total, total).numpy()


def zimage_schedule(scheduler_config: dict, steps: int, *, shift: float | None = None, denoise: float = 1.0,
                    convention: str = "denoise") -> core.Schedule:
    """Z-Image's schedule for ``steps`` model calls (``shift`` overrides the config's static shift)."""
    config = dict(scheduler_config)
    if shift is not None:
        if shift <= 0:
            raise EditKitError(f"shift must be greater than 0 (got {shift}); Z-Image-Turbo uses 3.0.")
        config["shift"] = float(shift)
    return core.flow_schedule(config, steps, denoise=denoise, convention=convention, base_sigmas=zimage_sigmas)


def cfg_from_diffusers(guidance_scale: float) -> float:
    """diffusers' Z-Image ``guidance_scale`` (0 = off) as EditKit/ComfyUI ``cfg`` (1 = off)."""
    return float(guidance_scale) + 1.0


def model_timesteps(schedule: core.Schedule, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The transformer's timestep per step, computed as ZImagePipeline does: ``(1000 - t) / 1000``.

    ``t`` is rebuilt from the schedule's float32 sigmas exactly as the scheduler builds its
    timesteps (``sigma * num_train_timesteps``), so the float32 rounding is the reference's.
    """
    t = schedule.sigmas[: schedule.steps].float() * num_train_timesteps
    return (num_train_timesteps - t) / num_train_timesteps


def activation_bytes(batch: int, tokens: int, dim: int, dtype: torch.dtype) -> int:
    """Rough working memory of one forward (activations of the widest layer, with headroom).

    Passed to the memory manager so it frees enough before loading; Z-Image's feed-forward is
    8/3 of the width and attention runs over image plus caption tokens.
    """
    element = torch.tensor([], dtype=dtype).element_size()
    return int(batch * (tokens + 512) * dim * element * 12)


def check_size(width: int, height: int, what: str = "Size") -> None:
    """Width and height must be multiples of 16; the message suggests the nearest valid size."""
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE or width < SIZE_MULTIPLE or height < SIZE_MULTIPLE:
        raise EditKitError(
            f"{what} {width}x{height} is not a multiple of {SIZE_MULTIPLE} on both sides, which Z-Image needs. "
            f"The nearest valid size is {nearest_valid(width)}x{nearest_valid(height)}."
        )


def nearest_valid(pixels: int) -> int:
    return max(SIZE_MULTIPLE, int(pixels / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)  # halves round up


def predictor(transformer: Component, device: torch.device, timesteps: torch.Tensor,
              captions: dict[str, list[torch.Tensor]]) -> core.Predict:
    """The velocity function the core calls: ``predict(x [B,16,h,w], step, branches)``.

    ``captions`` maps ``"cond"`` (and ``"uncond"`` for CFG) to one ``[T, D]`` tensor per sample,
    already on ``device`` in the model dtype. With both branches, ``x`` is the latent twice and
    the caption lists are concatenated the same way (one batched call).
    """
    model = transformer.module
    dtype = transformer.dtype
    t_model = timesteps.to(device=device, dtype=torch.float32)
    lists: dict[tuple, list] = {}

    def predict(x: torch.Tensor, i: int, branches: tuple) -> torch.Tensor:
        caps = lists.get(branches)
        if caps is None:
            caps = lists[branches] = [c for b in branches for c in captions[b]]
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))
        out = model(latents, t_model[i].expand(len(latents)), caps, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    return predict


@applies_loras
@torch.inference_mode()
def sample(
    transformer: Component,
    captions: list[torch.Tensor],
    noise: torch.Tensor,
    schedule: core.Schedule,
    runtime: Runtime,
    *,
    init: torch.Tensor | None = None,
    negative: list[torch.Tensor] | None = None,
    cfg: float = 1.0,
    sampler: core.SamplerSettings | None = None,
    progress=None,
) -> torch.Tensor:
    """Denoise ``noise`` ``[B,16,h,w]`` (from ``init``, model space, when partially denoising).

    ``transformer`` may carry LoRAs (a LoRA node's model): they apply for this call only.
    ``captions`` / ``negative`` hold one ``[T, D]`` tensor per sample. Returns the clean
    model-space latent (float32, on the compute device).
    """
    batch, _, h, w = noise.shape
    use_cfg = negative is not None and cfg != 1.0
    calls = 2 if use_cfg else 1
    tokens = (h // 2) * (w // 2)
    dim = int(transformer.module.config.dim)
    device = runtime.acquire(transformer, memory_required=activation_bytes(batch * calls, tokens, dim, transformer.dtype))
    dtype = transformer.dtype
    caps = {"cond": [c.to(device=device, dtype=dtype, non_blocking=True) for c in captions]}
    if use_cfg:
        caps["uncond"] = [c.to(device=device, dtype=dtype, non_blocking=True) for c in negative]
    predict = predictor(transformer, device, model_timesteps(schedule), caps)
    noise = noise.to(device=device, dtype=torch.float32, non_blocking=True)
    if init is not None:
        init = init.to(device=device, dtype=torch.float32, non_blocking=True)
    return core.sample(
        predict, noise, schedule, runtime, init=init, sampler=sampler or core.SamplerSettings(),
        guidance=core.Guidance(scale=cfg, enabled=use_cfg, batched=True),
        noise_shape=(batch, LATENT_CHANNELS, h, w), progress=progress, preview_format=FLUX_LATENT.preview,
    )
