"""Qwen-Image-Layered on the shared sampling core: one picture in, ``layers`` transparent RGBA layers out.

How the model sees the task (diffusers' ``QwenImageLayeredPipeline``, which this reproduces; parity in
tests/test_qwen_layered.py): the picture is resized to a resolution bucket (``resolution``² pixels at its
aspect ratio, sides multiples of 32), encoded by the RGBA VAE, and appended as condition tokens. The
latent being generated holds ``layers + 1`` frames (frame 0 is the whole picture again, frames 1..N the
layers), packed frame by frame into one token sequence; the layer RoPE numbers the frames 0..N and gives
the condition frame index -1. Every call also gets ``additional_t_cond = 0`` (the RGB/RGBA switch the
pipeline sets to 0). The schedule's shift is ``mu = sqrt(condition tokens / 256)`` instead of Qwen-Image's
linear rule, and Qwen's "true CFG" may rescale the guided velocity to the conditional one's norm
(``cfg_normalize``). Only frames 1..N are decoded.

What the family contributes to the core is the prediction function; the core owns the loop, CFG, progress,
previews (the frames side by side) and interruption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from ..core import sampling as core
from ..core.errors import EditKitError
from ..core.runtime import Component, Runtime
from . import vae as vae_ops
from .edit import _pad_texts, activation_bytes
from .latent import CHANNELS, PATCH, PREVIEW, SPATIAL, pack
from .layered_loading import check_transformer, check_vae
from .layered_text import caption, encode_prompt
from .sizes import calculate_dimensions

RESOLUTIONS = (640, 1024)  # the buckets Qwen-Image-Layered was trained on
MIN_RESOLUTION = 32
MAX_LAYERS = 20
BASE_TOKENS = 256  # the pipeline's base_seqlen: 256x256 pixels in 16x16 tokens


@dataclass
class LayeredResult:
    layers: torch.Tensor  # [layers,4,H,W] RGBA in 0..1, CPU
    latents: torch.Tensor  # [layers+1,16,h,w] model space, CPU (frame 0: the whole picture)
    caption: str  # the prompt the layers were generated for (the model's own caption when none was given)
    size: tuple[int, int]  # (width, height) of the layers


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The ``(width, height)`` the picture is decomposed at: ``resolution``² pixels at its aspect, multiples of 32."""
    if int(resolution) < MIN_RESOLUTION:
        raise EditKitError(f"resolution must be at least {MIN_RESOLUTION} (got {resolution}); the model was trained "
                           f"at {' and '.join(map(str, RESOLUTIONS))}.")
    w, h = calculate_dimensions(int(resolution) ** 2, width / height)
    multiple = SPATIAL * PATCH
    w, h = w // multiple * multiple, h // multiple * multiple
    if w < multiple or h < multiple:
        raise EditKitError(f"A {width}x{height} picture is too narrow for resolution {resolution}: one side would be "
                           "0 pixels. Crop it closer to square or raise the resolution.")
    return w, h


def pack_frames(latents: torch.Tensor) -> torch.Tensor:
    """``[B,F,C,H,W]`` frames → ``[B,F*(H/2)*(W/2),4C]`` tokens, frame after frame (the pipeline's packing)."""
    return rearrange(latents, "b f c (h ph) (w pw) -> b (f h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpack_frames(tokens: torch.Tensor, frames: int, latent_h: int, latent_w: int) -> torch.Tensor:
    return rearrange(tokens, "b (f h w) (c ph pw) -> b f c (h ph) (w pw)", f=frames, h=latent_h // PATCH,
                     w=latent_w // PATCH, ph=PATCH, pw=PATCH)


def to_pil_rgba(picture: torch.Tensor) -> Image.Image:
    """``[4,H,W]`` in 0..1 → 8-bit RGBA (rounded, so 8-bit inputs come back exactly)."""
    array = (picture.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGBA")


def from_pil_rgba(picture: Image.Image) -> torch.Tensor:
    array = np.asarray(picture.convert("RGBA")).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def resized(picture: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, Image.Image]:
    """The picture at the bucket size, as the VAE reads it (``[1,4,h,w]``) and as the captioner reads it (PIL).

    PIL's Lanczos on 8-bit RGBA, as diffusers' ``VaeImageProcessor`` (Pillow premultiplies alpha while
    resizing, so transparent pixels do not bleed colour); a picture already at that size is used as it is.
    """
    pil = to_pil_rgba(picture[0])
    if tuple(picture.shape[-2:]) == (height, width):
        return picture.float(), pil
    pil = pil.resize((width, height), resample=Image.Resampling.LANCZOS)
    return from_pil_rgba(pil), pil


def check_picture(picture: torch.Tensor) -> None:
    if picture.ndim != 4 or picture.shape[0] != 1 or picture.shape[1] != 4:
        raise EditKitError(f"Decomposition takes one RGBA picture [1,4,H,W]; got shape {tuple(picture.shape)}.")


def layered_schedule(scheduler_config: dict, steps: int, condition_tokens: int) -> core.Schedule:
    """The pipeline's schedule: its scheduler with ``mu = sqrt(condition_tokens / 256)`` (not the config's
    linear rule in the token count)."""
    mu = math.sqrt(condition_tokens / BASE_TOKENS)
    schedule = core.flow_schedule(scheduler_config, steps, mu=mu)
    if torch.isnan(schedule.sigmas).any():
        raise EditKitError(f"{steps} step(s) are too few for this schedule (its terminal stretch needs at least 2).")
    return schedule


@torch.inference_mode()
def decompose(
    transformer: Component,
    text_encoder,
    vae: Component,
    picture: torch.Tensor,
    runtime: Runtime,
    *,
    scheduler_config: dict,
    layers: int = 4,
    prompt: str = "",
    negative_prompt: str = " ",
    caption_head=None,
    caption_language: str = "en",
    true_cfg_scale: float = 4.0,
    cfg_normalize: bool = True,
    steps: int = 50,
    seed: int = 0,
    resolution: int = 640,
    cfg_batched: bool = True,
    progress=None,
) -> LayeredResult:
    """Decompose ``picture`` (``[1,4,H,W]`` RGBA in 0..1) into ``layers`` RGBA layers; see the module docstring.

    An empty ``prompt`` is replaced by the model's caption of the picture (needs ``caption_head``). An empty
    ``negative_prompt`` counts as " " (as EditKit's Qwen-Image Edit), so CFG runs whenever the scale is above 1.
    """
    check_picture(picture)
    if int(layers) < 1:
        raise EditKitError(f"layers must be at least 1 (got {layers}): the number of transparent layers to split "
                           "the picture into (4 is the model's default).")
    if int(layers) > MAX_LAYERS:
        raise EditKitError(f"layers must be at most {MAX_LAYERS} (got {layers}).")
    layers = int(layers)
    check_transformer(transformer)
    check_vae(vae)
    negative_prompt = negative_prompt or " "
    use_cfg = float(true_cfg_scale) > 1.0
    width, height = bucket_size(picture.shape[-1], picture.shape[-2], resolution)
    pixels, vl_picture = resized(picture, width, height)

    encoder = text_encoder.get() if hasattr(text_encoder, "get") else text_encoder
    if not prompt or not prompt.strip():
        if caption_head is None:
            raise EditKitError(
                "The prompt is empty and this text encoder cannot write a caption (it was loaded without its "
                "language-model head). Describe the picture in the prompt, or load the text encoder with "
                "EditKit · Qwen-Image-Layered Loader from the Qwen-Image-Layered folder."
            )
        prompt = caption(encoder, caption_head, vl_picture, runtime, caption_language)
    cond = encode_prompt(encoder, prompt, runtime)
    uncond = encode_prompt(encoder, negative_prompt, runtime) if use_cfg else None
    model = transformer.module
    if cond.shape[-1] != int(model.config.joint_attention_dim):
        raise EditKitError(
            f"The text encoder gives {cond.shape[-1]}-wide states but this transformer reads "
            f"{model.config.joint_attention_dim}: Qwen-Image-Layered needs Qwen2.5-VL-7B (qwen_2.5_vl_7b*.safetensors)."
        )

    condition = vae_ops.encode(vae, pixels, runtime)  # [1,16,h,w] model space
    lh, lw = height // SPATIAL, width // SPATIAL
    frames = layers + 1
    condition_tokens = pack(condition)
    img_shapes = [(1, lh // PATCH, lw // PATCH)] * (frames + 1)
    schedule = layered_schedule(scheduler_config, steps, condition_tokens.shape[1])
    noise_shape = (1, frames, CHANNELS, lh, lw)
    noise = core.seeded_noise(noise_shape, seed)
    tokens = frames * (lh // PATCH) * (lw // PATCH)

    dtype = transformer.dtype
    rows = 2 if use_cfg and cfg_batched else 1
    text_len = max(cond.shape[1], 0 if uncond is None else uncond.shape[1])
    device = runtime.acquire(transformer, memory_required=activation_bytes(
        rows, tokens + condition_tokens.shape[1], text_len, dtype))
    condition_tokens = condition_tokens.to(device=device, dtype=dtype)
    timesteps = schedule.timesteps.to(device=device, dtype=dtype)
    texts = {"cond": cond, "uncond": uncond}
    cache: dict[tuple, tuple] = {}

    def extras(branches: tuple) -> tuple:
        """Per-branch-combination inputs that stay the same over the steps, built once."""
        found = cache.get(branches)
        if found is None:
            states, text_mask = _pad_texts([texts[b] for b in branches])
            n = len(branches)
            found = cache[branches] = (
                states.to(device=device, dtype=dtype), None if text_mask is None else text_mask.to(device),
                condition_tokens.expand(n, -1, -1), torch.zeros(n, dtype=torch.long, device=device), n)
        return found

    def predict(x: torch.Tensor, i: int, branches: tuple) -> torch.Tensor:
        states, text_mask, cond_tokens, is_rgb, n = extras(branches)
        velocity = model(
            hidden_states=torch.cat([x.to(dtype), cond_tokens], dim=1),
            timestep=timesteps[i].expand(n),
            encoder_hidden_states=states,
            encoder_hidden_states_mask=text_mask,
            img_shapes=[img_shapes] * n,
            additional_t_cond=is_rgb,
            return_dict=False,
        )[0]
        return velocity[:, :tokens]

    def preview(x0: torch.Tensor) -> torch.Tensor:
        return rearrange(unpack_frames(x0, frames, lh, lw), "b f c h w -> b c h (f w)")

    result = core.sample(
        predict, pack_frames(noise).to(device), schedule, runtime,
        guidance=core.Guidance(scale=float(true_cfg_scale), rescale="norm" if cfg_normalize else "none",
                               batched=cfg_batched, enabled=use_cfg),
        sampler=core.SamplerSettings(seed=seed), noise_shape=noise_shape, to_sampler_layout=pack_frames,
        preview_of=preview, progress=progress, preview_format=PREVIEW,
    )
    latents = unpack_frames(result, frames, lh, lw)[0]  # [frames,16,h,w]
    images = vae_ops.decode(vae, latents[1:], runtime).float().cpu()
    return LayeredResult(layers=images, latents=latents.float().cpu(), caption=prompt, size=(width, height))
