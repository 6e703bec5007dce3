"""The FLUX.1 Redux prior: pictures → image tokens → a FLUX.1 conditioning, with no text encoder.

Reference semantics are diffusers' ``FluxPriorReduxPipeline``: SigLIP's ``last_hidden_state``
goes through the Redux embedder (``redux_down(silu(redux_up(x)))``) to T5-wide tokens, which are
appended after the T5 states; with no text encoder the T5 states are 512 zero tokens and the
pooled vector is zero. Several pictures are summed, each scaled by its ``prompt_embeds_scale``.
EditKit adds what ComfyUI users add with ReduxAdvanced and chained StyleModelApply nodes:

* ``strength`` × per-picture ``weights`` is diffusers' per-image ``prompt_embeds_scale``; it
  scales the picture tokens only. (diffusers also multiplies the zero T5 states and the zero
  pooled vector, i.e. ``pooled_prompt_embeds_scale`` has no effect without a prompt; with a
  prompt EditKit keeps the prompt as it is, as ComfyUI's StyleModelApply does.)
* ``combine``: ``sum`` (diffusers: one set of tokens, the weighted sum) or ``concat`` (ComfyUI's
  chained StyleModelApply: every picture's tokens one after another; more tokens, each picture
  kept apart).
* token downsampling: the 27x27 token grid is resized to ceil(27/f) per side (f = 1 keeps every
  token untouched), which weakens the picture and leaves the prompt more say.
* the zero prompt's widths come from the FLUX.1 transformer's config (``joint_attention_dim``,
  ``pooled_projection_dim``), not from constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.errors import EditKitError
from ...core.runtime import Runtime
from . import preprocess
from .loading import ReduxPrior

COMBINE_MODES = ("sum", "concat")
DOWNSAMPLING_MODES = ("area", "bicubic", "bilinear", "nearest-exact", "nearest")
ZERO_TEXT_TOKENS = 512  # diffusers' FluxPriorReduxPipeline: T5 max_sequence_length of the zero prompt
KNOWN_TEXT_WIDTHS = {3584: "Qwen-Image's Qwen2.5-VL", 2560: "Z-Image's Qwen3", 768: "CLIP-L (SD 1.x)",
                     2048: "SDXL's CLIP-L + CLIP-G", 4096: "T5-XXL"}


@dataclass(frozen=True)
class ReduxSettings:
    strength: float = 1.0
    weights: tuple[float, ...] | None = None  # one per picture; None = all 1
    downsampling_factor: float = 1.0
    downsampling_mode: str = "area"
    combine: str = "sum"
    crop: str = "center"
    autocrop_margin: float = 0.1


def parse_weights(text: str | None, count: int) -> tuple[float, ...] | None:
    """A comma list of per-picture weights (``"0.7, 0.3"``); empty = every picture weight 1."""
    if text is None or not text.strip():
        return None
    try:
        weights = tuple(float(part) for part in text.replace(";", ",").split(","))
    except ValueError as exc:
        raise EditKitError(f"weights '{text}' is not a comma-separated list of numbers (e.g. '0.7, 0.3').") from exc
    if len(weights) != count:
        raise EditKitError(
            f"weights lists {len(weights)} value(s) but the image batch holds {count} picture(s). Give one weight "
            "per picture, or leave weights empty for equal weights."
        )
    bad = [w for w in weights if w < 0 or not math.isfinite(w)]
    if bad:
        raise EditKitError(f"weights must be 0 or more (got {bad[0]}). Use 0 to leave a picture out.")
    return weights


def check_settings(settings: ReduxSettings) -> None:
    if settings.combine not in COMBINE_MODES:
        raise EditKitError(f"Unknown combine mode '{settings.combine}'. Use one of: {', '.join(COMBINE_MODES)}.")
    if settings.downsampling_mode not in DOWNSAMPLING_MODES:
        raise EditKitError(f"Unknown downsampling mode '{settings.downsampling_mode}'. Use one of: "
                           f"{', '.join(DOWNSAMPLING_MODES)}.")
    if not settings.downsampling_factor >= 1:
        raise EditKitError(f"downsampling_factor must be 1 or more (got {settings.downsampling_factor}); "
                           "1 keeps all tokens.")
    if settings.strength < 0:
        raise EditKitError(f"strength must be 0 or more (got {settings.strength}).")


@torch.inference_mode()
def image_tokens(prior: ReduxPrior, values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """SigLIP pixel values ``[N,3,S,S]`` → Redux tokens ``[N, grid², token_width]`` (float32, intermediate)."""
    encoder, embedder = prior.encoder, prior.embedder
    device = runtime.acquire(encoder)
    hidden = encoder.module(pixel_values=values.to(device=device, dtype=encoder.dtype)).last_hidden_state
    device = runtime.acquire(embedder)
    tokens = embedder.module(hidden.to(device=device, dtype=embedder.dtype)).image_embeds
    return tokens.to(device=runtime.intermediate_device, dtype=torch.float32)


def downsample(tokens: torch.Tensor, factor: float, mode: str) -> torch.Tensor:
    """Resize each picture's square token grid to ceil(grid / factor) per side; factor 1 is the identity."""
    if factor == 1:
        return tokens
    count, length, width = tokens.shape
    grid = math.isqrt(length)
    if grid * grid != length:
        raise EditKitError(f"Cannot downsample {length} Redux tokens: they do not form a square grid.")
    side = max(1, math.ceil(grid / factor))
    planes = tokens.transpose(1, 2).reshape(count, width, grid, grid)
    options = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    planes = F.interpolate(planes, size=(side, side), mode=mode, **options)
    return planes.reshape(count, width, side * side).transpose(1, 2)


def combine(tokens: torch.Tensor, scales: torch.Tensor, mode: str) -> torch.Tensor:
    """``[N,T,D]`` picture tokens, ``[N]`` scales → one conditioning's picture tokens ``[1,T',D]``."""
    scaled = tokens * scales.to(tokens)[:, None, None]
    if mode == "sum":
        return scaled.sum(dim=0, keepdim=True)
    return scaled.reshape(1, -1, tokens.shape[-1])


def picture_scales(settings: ReduxSettings, count: int) -> torch.Tensor:
    weights = settings.weights if settings.weights is not None else (1.0,) * count
    return torch.tensor([settings.strength * w for w in weights], dtype=torch.float32)


@dataclass
class ReduxOutput:
    tokens: torch.Tensor  # [1, T', D] the pictures' tokens, scaled and combined
    seen: torch.Tensor  # IMAGE [N,S,S,3]: what SigLIP saw


def encode(prior: ReduxPrior, images: torch.Tensor, settings: ReduxSettings, runtime: Runtime,
           mask: torch.Tensor | None = None) -> ReduxOutput:
    """``[N,3,H,W]`` pictures (0..1) → their combined Redux tokens."""
    check_settings(settings)
    count = images.shape[0]
    if settings.weights is not None and len(settings.weights) != count:
        raise EditKitError(f"{len(settings.weights)} weights for {count} pictures. Give one weight per picture.")
    pictures = preprocess.square_pictures(images, settings.crop, prior.processor, mask, settings.autocrop_margin)
    values = preprocess.pixel_values(pictures, prior.processor)
    tokens = image_tokens(prior, values, runtime)
    tokens = downsample(tokens, settings.downsampling_factor, settings.downsampling_mode)
    combined = combine(tokens, picture_scales(settings, count), settings.combine)
    return ReduxOutput(combined, preprocess.seen_pictures(values, prior.processor))


def zero_text(token_width: int, pooled_width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' text-encoder-free prompt: 512 zero T5 tokens and a zero pooled vector."""
    return (torch.zeros(1, ZERO_TEXT_TOKENS, token_width, device=device),
            torch.zeros(1, pooled_width, device=device))


def _family_hint(width: int) -> str:
    known = KNOWN_TEXT_WIDTHS.get(width)
    return f" ({width} is the width of {known})" if known else ""


def append_to_conditioning(conditioning, tokens: torch.Tensor, pooled_width: int | None = None) -> list:
    """Append picture tokens to every entry of a FLUX.1 CONDITIONING (as ComfyUI's StyleModelApply does).

    The prompt's own states, pooled vector and settings (guidance) are kept as they are.
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise EditKitError("The conditioning to append to is empty. Connect a FLUX.1 prompt, or leave the input "
                           "unconnected for a prompt-free Redux conditioning.")
    fix = ("Give a FLUX.1 prompt (EditKit · Flux Text Encode, or CLIPTextEncode with a DualCLIPLoader of type "
           "'flux'), or leave conditioning unconnected.")
    width = tokens.shape[-1]
    out = []
    for states, extra in conditioning:
        if not torch.is_tensor(states) or states.ndim != 3:
            raise EditKitError(f"The conditioning to append to does not hold text states [batch, tokens, width]. {fix}")
        pooled = extra.get("pooled_output")
        if states.shape[-1] != width or pooled is None:
            what = f"token width {states.shape[-1]}{_family_hint(states.shape[-1])}"
            if pooled is None:
                what += " and no CLIP pooled vector"
            raise EditKitError(
                f"The conditioning to append to is not a FLUX.1 prompt: {what}; FLUX.1 Redux tokens are {width} "
                f"wide (T5-XXL) and need CLIP-L's pooled vector. {fix}"
            )
        if pooled_width is not None and pooled.shape[-1] != pooled_width:
            raise EditKitError(f"The conditioning's pooled vector is {pooled.shape[-1]} wide, but this FLUX.1 "
                               f"transformer expects {pooled_width} (CLIP-L). {fix}")
        if "attention_mask" in extra:
            raise EditKitError("The conditioning to append to carries an attention mask (from StyleModelApply's "
                               "attn_bias). Apply EditKit · Redux Encode first, or use strength_type multiply.")
        picture = tokens.to(device=states.device, dtype=states.dtype).expand(states.shape[0], -1, -1)
        out.append([torch.cat([states, picture], dim=1), dict(extra)])
    return out
