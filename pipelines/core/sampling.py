"""The sampling core every EditKit sampler runs on: schedules, samplers, CFG, denoise conventions.

A model family contributes only a *prediction function* ``predict(x, step, branches)`` that
returns the velocity of the flow-matching model for the running latent ``x`` at schedule step
``step`` (the family precomputes whatever timestep tensor its transformer wants from the
:class:`Schedule`). ``branches`` names which conditionings the call covers, in batch order:
``("cond",)``, ``("uncond",)`` or ``("cond", "uncond")`` — in the last case ``x`` is the running
latent repeated twice along the batch axis and the family stacks its positive and negative
conditioning the same way, so classifier-free guidance costs one batched model call per step.

The core owns the loop: the sampler update (:data:`SAMPLERS`), CFG (:class:`Guidance`),
progress with an optional preview, and one interrupt check per step. It keeps the running
latent in float32, precomputes every per-step scalar as Python floats and draws any ancestral
noise before the loop starts, so a step never syncs the host with the device or copies to it.

Schedules come from a diffusers ``FlowMatchEulerDiscreteScheduler`` config (the model's own
``scheduler_config.json``), so FLUX's resolution-dependent shift, Z-Image-Turbo's static shift
and Qwen-Image's dynamic exponential shift with terminal stretch are exactly the reference
pipelines'. Two partial-denoise conventions exist and are named explicitly (:data:`CONVENTIONS`):

* ``"denoise"`` — ComfyUI KSampler's: ``steps`` is the number of model calls; a schedule for
  ``int(steps / denoise)`` steps is built and only its last ``steps`` are run. EditKit's default.
* ``"strength"`` — diffusers img2img's: the schedule for ``steps`` is built and the last
  ``steps - int(steps - min(steps * strength, steps))`` of it are run (``int(steps * strength)``
  for most values), as ``get_timesteps`` in diffusers' img2img pipelines does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import EditKitError
from .runtime import Progress, Runtime

SAMPLERS = ("euler", "euler_ancestral")
CONVENTIONS = ("denoise", "strength")
CFG_RESCALES = ("none", "norm")

Predict = Callable[[torch.Tensor, int, tuple], torch.Tensor]
AfterStep = Callable[[torch.Tensor, int], torch.Tensor]  # (x after step i, i) -> the latent step i + 1 starts from
PreviewOf = Callable[[torch.Tensor], torch.Tensor]  # x0 estimate of the first sample -> raw latent for previews


@dataclass(frozen=True)
class Schedule:
    """Sigmas from noisiest to the last (``len == steps + 1``, the last usually 0) and model timesteps.

    ``timesteps`` are the scheduler's timesteps divided by ``num_train_timesteps`` (so in 0..1,
    equal to the sigmas for flow models); families convert them to what their transformer reads.
    """

    sigmas: torch.Tensor  # float32, CPU
    timesteps: torch.Tensor  # float32, CPU

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def start_sigma(self) -> float:
        return float(self.sigmas[0])


def linear_sigmas(total: int) -> np.ndarray:
    """``linspace(1, 1/total, total)``: the unshifted sigmas FLUX, Qwen-Image and Z-Image pipelines pass."""
    return np.linspace(1.0, 1.0 / total, total)


def dynamic_shift_mu(config: dict, image_seq_len: int) -> float:
    """The ``mu`` of resolution-dependent shifting, by diffusers' own ``calculate_shift``.

    The bounds come from the scheduler config (diffusers' pipelines pass the same keys); the
    defaults are the function's own, so a config without them shifts as the pipelines do.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    bounds = {
        "base_seq_len": "base_image_seq_len",
        "max_seq_len": "max_image_seq_len",
        "base_shift": "base_shift",
        "max_shift": "max_shift",
    }
    return calculate_shift(image_seq_len, **{arg: config[key] for arg, key in bounds.items() if key in config})


def check_partial(denoise: float, convention: str) -> None:
    if convention not in CONVENTIONS:
        raise EditKitError(f"Unknown denoise convention '{convention}'. Use one of: {', '.join(CONVENTIONS)}.")
    if not 0.0 < float(denoise) <= 1.0:
        what = "strength" if convention == "strength" else "denoise"
        raise EditKitError(
            f"{what} must be greater than 0 and at most 1 (got {denoise}). 1 means a full generation; "
            f"lower values keep more of the starting picture."
        )


def flow_schedule(
    scheduler_config: dict,
    steps: int,
    *,
    image_seq_len: int | None = None,
    denoise: float = 1.0,
    convention: str = "denoise",
    base_sigmas: Callable[[int], np.ndarray] = linear_sigmas,
    mu: float | Callable[[int], float] | None = None,
) -> Schedule:
    """The schedule a diffusers flow-matching pipeline with this scheduler config would run.

    ``image_seq_len`` (the transformer's image token count) is needed when the config uses
    dynamic shifting, unless the pipeline states its own ``mu`` (Qwen-Image-Layered does). ``mu`` may
    also be a function of the number of steps the full schedule has (FLUX.2's empirical shift depends on
    it, and in the ``denoise`` convention that number is ``int(steps / denoise)``, not ``steps``).
    ``denoise`` is read in the named ``convention`` (module docstring).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if int(steps) < 1:
        raise EditKitError(f"steps must be at least 1 (got {steps}).")
    check_partial(denoise, convention)
    steps = int(steps)
    total = steps
    if convention == "denoise" and denoise < 1.0:
        total = max(steps, int(steps / denoise))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    if callable(mu):
        mu = float(mu(total))
    if not scheduler.config.get("use_dynamic_shifting", False):
        mu = None
    elif mu is None:
        if image_seq_len is None:
            raise ValueError("this scheduler shifts by resolution: pass image_seq_len")
        mu = dynamic_shift_mu(scheduler.config, image_seq_len)
    scheduler.set_timesteps(sigmas=base_sigmas(total), mu=mu, device="cpu")
    sigmas = scheduler.sigmas.float()
    timesteps = scheduler.timesteps.float() / scheduler.config.num_train_timesteps
    if convention == "denoise":
        keep = steps
    else:
        init = min(steps * float(denoise), steps)
        keep = steps - int(max(steps - init, 0))  # >= 1 for any strength > 0
    return Schedule(sigmas=sigmas[-(keep + 1):].clone(), timesteps=timesteps[-keep:].clone())


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise from ``seed`` drawn on the CPU in float32, as ComfyUI draws its initial noise.

    diffusers' ``randn_tensor`` with a CPU generator: the noise is the same on every device
    (kernels may still differ between GPUs), and no other node's use of the global RNG changes it.
    """
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator("cpu").manual_seed(int(seed) % (2**64))
    return randn_tensor(tuple(shape), generator=generator, device=torch.device("cpu"), dtype=torch.float32)


@dataclass(frozen=True)
class SamplerSettings:
    """Which update rule runs, with ComfyUI's ``euler_ancestral`` (rectified-flow form) parameters.

    ``seed`` seeds the CPU generator of the ancestral noise (the node's seed, as ComfyUI does);
    ``noise_shape`` is the layout the noise is drawn in (the family's unpacked latent, so the
    noise matches ComfyUI's draw for the same seed), ``to_sampler_layout`` maps it to ``x``'s layout.
    """

    name: str = "euler"
    eta: float = 1.0
    s_noise: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise EditKitError(f"Unknown sampler '{self.name}'. EditKit samplers offer: {', '.join(SAMPLERS)}.")


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``.

    ``scale == 1`` (or no negative conditioning) skips the uncond branch entirely. ``rescale``
    ``"norm"`` is Qwen-Image's "true CFG": the combined velocity is rescaled per token to the
    norm of the conditional one. ``batched`` runs cond and uncond as one model call (faster
    where memory allows; off halves the activation memory).
    """

    scale: float = 1.0
    rescale: str = "none"
    batched: bool = True
    enabled: bool = True  # False when there is no negative conditioning

    def __post_init__(self):
        if self.rescale not in CFG_RESCALES:
            raise ValueError(f"unknown CFG rescale '{self.rescale}'")

    @property
    def active(self) -> bool:
        return self.enabled and self.scale != 1.0


def _guided(predict: Predict, guidance: Guidance) -> Callable[[torch.Tensor, int], torch.Tensor]:
    if not guidance.active:
        return lambda x, i: predict(x, i, ("cond",)).float()
    scale = float(guidance.scale)

    def combine(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        mixed = uncond + scale * (cond - uncond)
        if guidance.rescale == "norm":
            mixed = mixed * (torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
                             / torch.linalg.vector_norm(mixed, dim=-1, keepdim=True))
        return mixed

    if guidance.batched:
        def both(x: torch.Tensor, i: int) -> torch.Tensor:
            cond, uncond = predict(torch.cat([x, x]), i, ("cond", "uncond")).float().chunk(2)
            return combine(cond, uncond)
        return both

    def separate(x: torch.Tensor, i: int) -> torch.Tensor:
        return combine(predict(x, i, ("cond",)).float(), predict(x, i, ("uncond",)).float())
    return separate


def start_latent(noise: torch.Tensor, schedule: Schedule, init: torch.Tensor | None) -> torch.Tensor:
    """The first running latent: ``sigma0 * noise + (1 - sigma0) * init`` (flow matching's forward process).

    With no ``init`` (text-to-image) the clean latent is zero, as for ComfyUI's empty latent.
    """
    sigma = schedule.start_sigma
    x = noise.float()
    if init is None:
        return x if sigma == 1.0 else sigma * x
    return sigma * x + (1.0 - sigma) * init.float()


def _ancestral_noise(settings: SamplerSettings, steps: int, noise_shape, to_layout, device) -> list[torch.Tensor]:
    """Every step's fresh noise, drawn up front from a CPU generator and moved to the device once."""
    generator = torch.Generator("cpu").manual_seed(int(settings.seed) % (2**64))
    draws = torch.stack([torch.randn(noise_shape, generator=generator, dtype=torch.float32) for _ in range(steps)])
    draws = draws.to(device, non_blocking=True)
    return [to_layout(d) for d in draws.unbind(0)]


@torch.inference_mode()
def sample(
    predict: Predict,
    noise: torch.Tensor,
    schedule: Schedule,
    runtime: Runtime,
    *,
    init: torch.Tensor | None = None,
    sampler: SamplerSettings = SamplerSettings(),
    guidance: Guidance = Guidance(),
    noise_shape: tuple[int, ...] | None = None,
    to_sampler_layout: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    preview_of: PreviewOf | None = None,
    progress: Progress | None = None,
    preview_format: str = "Flux",
    after_step: AfterStep | None = None,
) -> torch.Tensor:
    """Run ``schedule`` from ``noise`` (and ``init`` when partially denoising); return the clean latent.

    ``noise`` and ``init`` are in the sampler layout (e.g. Flux's packed tokens) on the compute
    device; the result is float32 in the same layout. ``noise_shape`` / ``to_sampler_layout``
    describe how ancestral noise is drawn (default: ``noise``'s own shape). ``preview_of`` maps the
    first sample's x0 estimate to a model-space latent of the family's ``preview_format``.
    ``after_step(x, i)`` (optional) replaces the latent after step ``i``, before step ``i + 1``: FLUX.2
    inpainting puts the noised source back outside the mask there, as its reference pipeline does.
    """
    x = start_latent(noise, schedule, init)
    sigmas = [float(s) for s in schedule.sigmas]
    velocity_of = _guided(predict, guidance)
    fresh = None
    if sampler.name == "euler_ancestral" and sampler.eta > 0:
        fresh = _ancestral_noise(sampler, schedule.steps, noise_shape or tuple(x.shape), to_sampler_layout, x.device)
    progress = progress if progress is not None else runtime.progress(schedule.steps, preview_format)

    for i in range(schedule.steps):
        runtime.check_interrupt()
        v = velocity_of(x, i)
        s, s_next = sigmas[i], sigmas[i + 1]
        if sampler.name == "euler" or s_next == 0.0:
            x_next = x + (s_next - s) * v
        else:
            x_next = _ancestral_step(x, v, s, s_next, sampler, None if fresh is None else fresh[i])

        def preview(x=x, v=v, s=s):  # hosts call this only when they show previews
            x0 = x[:1] - s * v[:1]
            return preview_of(x0) if preview_of is not None else x0

        x = x_next if after_step is None else after_step(x_next, i)
        progress.update(preview=preview)
    return x


def _ancestral_step(x, v, s: float, s_next: float, settings: SamplerSettings, eps) -> torch.Tensor:
    """One step of ComfyUI's ``sample_euler_ancestral_RF``: a deterministic step to ``sigma_down``,
    then re-noising to ``s_next`` with the rectified-flow scaling of the clean part."""
    denoised = x - s * v
    sigma_down = s_next * (1.0 + (s_next / s - 1.0) * settings.eta)
    alpha_next, alpha_down = 1.0 - s_next, 1.0 - sigma_down
    ratio = sigma_down / s
    x = ratio * x + (1.0 - ratio) * denoised
    if eps is None:
        return x
    renoise = math.sqrt(max(s_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2, 0.0))
    return (alpha_next / alpha_down) * x + eps * (settings.s_noise * renoise)
