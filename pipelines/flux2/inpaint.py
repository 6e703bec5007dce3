"""FLUX.2 [klein] inpainting: ComfyUI's MASK convention, ``Flux2KleinInpaintPipeline``'s sampling, exact blend-back.

As the reference pipeline does it:

* the source picture's latent is both the starting point (noised to the first sigma; ``denoise`` 1 starts from
  pure noise) and the first reference picture (time id 10); extra reference pictures follow (20, 30, ...);
* the mask is resized bilinearly to the token grid (``H/16 x W/16``) and, after every step, the tokens outside
  it are replaced by the source latent noised to the next step's sigma (the clean source after the last step):
  the core's ``after_step`` hook;
* the schedule is klein's (empirical mu over the picture's tokens); ``denoise`` follows the named convention.

Differences, both on purpose: the MASK is ComfyUI's (``[B, H, W]`` or ``[H, W]``, 1 = repaint) and soft values
are kept (diffusers rounds its mask at 0.5 first; the two agree for binary masks, which the parity test uses);
and the decoded picture is blended back with the soft mask in pixel space, so every pixel where the mask is 0
comes back exactly (the VAE round trip would otherwise change it slightly). A mask that is 0 everywhere
returns the input without sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import sampling as core
from ..core.errors import EditKitError
from ..core.runtime import Component, Runtime
from . import latent as fl
from .sampler import check_size, encode_references, flux2_schedule, model_space, sample
from .vae import decode_raw


def read_mask(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """A ComfyUI MASK → ``[B, 1, H, W]`` float in 0..1, checked against the picture's size and batch."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise EditKitError(f"The mask has shape {tuple(mask.shape)}; a MASK is [batch, height, width].")
    if tuple(mask.shape[-2:]) != (height, width):
        raise EditKitError(f"The mask is {mask.shape[-1]}x{mask.shape[-2]} but the picture is {width}x{height}. "
                           "Resize the mask to the picture (e.g. with the same Image Scale node), or draw it on "
                           "this picture.")
    if mask.shape[0] not in (1, batch):
        raise EditKitError(f"There are {mask.shape[0]} masks for {batch} pictures; give one mask or one per picture.")
    return mask.float().clamp(0.0, 1.0).unsqueeze(1).expand(batch, -1, -1, -1)


def token_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, 1, H, W]`` → ``[B, h*w, 1]``: bilinear to the token grid, as the reference pipeline resizes its mask."""
    return fl.pack(F.interpolate(mask, size=(h, w), mode="bilinear"))


def blend(result: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask * result + (1 - mask) * source``, exact where the mask is 0 or 1 (pixels ``[B, 3, H, W]``)."""
    return torch.where(mask == 0, source, torch.where(mask == 1, result, mask * result + (1 - mask) * source))


def inpaint_latent(model, vae: Component, text: torch.Tensor, runtime: Runtime, image: torch.Tensor,
                   mask: torch.Tensor, *, seed: int = 0, steps: int = 4, references: list[torch.Tensor] | None = None,
                   negative: torch.Tensor | None = None, cfg: float = 1.0, denoise: float = 1.0,
                   convention: str = "strength", sampler: str = "euler",
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample the masked area; returns the raw latent ``[B, 32, H/8, W/8]`` (float32, CPU), before any blend-back.

    ``image`` is ``[B, 3, H, W]`` in 0..1 and ``mask`` ``[B, 1, H, W]`` (:func:`read_mask`).
    """
    batch, _, height, width = image.shape
    check_size(width, height, "The picture")
    h, w = height // fl.SIZE_MULTIPLE, width // fl.SIZE_MULTIPLE
    for k, picture in enumerate(references or []):
        check_size(picture.shape[-1], picture.shape[-2], f"Reference picture {k + 1}")
    source = model_space(vae, image, runtime)  # [B, 128, h, w]
    # the source picture is the first reference (time id 10), the others follow
    refs = encode_references(vae, [], runtime, latents=[source] + [model_space(vae, p, runtime)
                                                                    for p in references or []])
    if noise is None:
        noise = core.seeded_noise((batch, fl.MODEL_CHANNELS, h, w), seed)
    schedule = flux2_schedule(model.scheduler_config, steps, h * w, denoise=denoise, convention=convention)
    transformer = model.transformer.get()
    sigmas = [float(s) for s in schedule.sigmas]
    state: dict[str, torch.Tensor] = {}

    def keep_outside(x: torch.Tensor, i: int) -> torch.Tensor:
        if not state:
            state["init"] = fl.pack(source.to(device=x.device, dtype=torch.float32))
            state["noise"] = fl.pack(noise.to(device=x.device, dtype=torch.float32))
            state["mask"] = token_mask(mask.to(device=x.device, dtype=torch.float32), h, w)
        init, m = state["init"], state["mask"]
        if i < schedule.steps - 1:
            s = sigmas[i + 1]
            init = s * state["noise"] + (1.0 - s) * init
        return (1 - m) * init + m * x

    out = sample(transformer, text, noise, schedule, runtime, references=refs, init=source, negative=negative,
                 cfg=cfg, sampler=core.SamplerSettings(name=sampler, seed=seed), after_step=keep_outside)
    return fl.model_to_raw(vae, out).cpu()


def inpaint(model, vae: Component, text: torch.Tensor, runtime: Runtime, image: torch.Tensor, mask: torch.Tensor,
            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Inpaint ComfyUI pictures: ``image`` ``[B, H, W, 3]`` and MASK → (IMAGE ``[B, H, W, 3]``, raw latent).

    The picture is the blend of the decoded result and the source with the soft mask (exact outside it).
    """
    pixels = image.movedim(-1, 1).float()
    batch, _, height, width = pixels.shape
    masks = read_mask(mask, batch, height, width)
    if not bool((masks > 0).any()):
        raw = fl.unpatchify(fl.latent_format(vae).to_raw(model_space(vae, pixels, runtime))).cpu()
        return image.clone(), raw
    raw = inpaint_latent(model, vae, text, runtime, pixels, masks, **kwargs)
    decoded = decode_raw(vae, raw, runtime).cpu()
    out = blend(decoded, pixels.cpu(), masks.cpu())
    return out.movedim(1, -1).contiguous(), raw
