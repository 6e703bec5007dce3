"""Input specs and small conversions shared by EditKit's node modules.

Kept here so every sampler offers the same seed / steps / guidance / denoise / batch widgets
with the same ranges and tooltips.
"""

from __future__ import annotations

import logging

import torch

from ..pipelines.core.errors import EditKitError
from ..pipelines.core.loading import file_key
from ..pipelines.flux.conditioning import FluxText, read_conditioning
from . import comfy_bridge as bridge

log = logging.getLogger("EditKit")

NONE = "(none)"
FROM_FOLDER = "(from folder)"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


SEED_TOOLTIP = (
    "Random seed. The starting noise is drawn on the CPU from it, so a seed gives the same noise on every machine; "
    "pictures from different GPUs or settings agree closely but not bit for bit (their kernels differ)."
)


def seed_input(tooltip: str = SEED_TOOLTIP) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": tooltip})


def steps_input(default: int = 28) -> tuple:
    return ("INT", {"default": default, "min": 1, "max": 200,
                    "tooltip": "Number of sampling steps (transformer calls). More steps: finer detail, slower."})


def guidance_input(default: float = 30.0) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 100.0, "step": 0.5,
                      "tooltip": "FLUX.1 guidance embedding. FLUX.1-Fill-dev is tuned for 30. A 'guidance' set on "
                                 "the CONDITIONING (FluxGuidance) takes precedence over this value."})


def denoise_input() -> tuple:
    return ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                      "tooltip": "How much to change: 1.0 starts from pure noise; lower values start from the input "
                                 "image noised to that level (img2img). Steps stays the number of transformer calls."})


def batch_input() -> tuple:
    return ("INT", {"default": 1, "min": 1, "max": 64,
                    "tooltip": "Results per input image (each with different noise from the same seed)."})


def flux_text(conditioning, transformer_config, widget_guidance: float) -> tuple[FluxText, float]:
    """Read a Flux CONDITIONING for a transformer and pick the guidance to use."""
    text = read_conditioning(
        conditioning, transformer_config.joint_attention_dim, transformer_config.pooled_projection_dim
    )
    guidance = widget_guidance
    if text.guidance is not None and text.guidance != widget_guidance:
        log.info("EditKit: using guidance %.2f from the CONDITIONING (widget: %.2f).", text.guidance, widget_guidance)
        guidance = text.guidance
    return text, guidance


def files_signature(paths) -> str:
    """Size and modification time of model files (or of every file in a model folder).

    Loader nodes return this from IS_CHANGED, so replacing a checkpoint under the same name (e.g.
    a newer training checkpoint) reloads it instead of reusing ComfyUI's cached output.
    """
    parts = []
    for path in paths:
        if path is None:
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        parts += [repr(file_key(p)) for p in files]
    return "|".join(parts)


def chosen_file(value: str, folder: str):
    """The path of a loader's file widget, or None for "(none)" / "(from folder)"."""
    return None if value in (NONE, FROM_FOLDER, "", None) else bridge.model_path(folder, value)


def chosen_folder(value: str):
    """The path of a loader's ``models/diffusers`` folder widget, or None for "(none)"."""
    return None if value in (NONE, "", None) else bridge.model_path("diffusers", value)


def loader_signature(diffusers_folder: str | None, *files: tuple[str, str]) -> str:
    """A loader's IS_CHANGED: size and mtime of its chosen folder and files (``(widget value, models folder)``).

    A missing file gives "" here: the load itself reports it, with the folder and what was expected.
    """
    try:
        folder = chosen_folder(diffusers_folder) if diffusers_folder is not None else None
        return files_signature([folder, *(chosen_file(v, f) for v, f in files)])
    except EditKitError:
        return ""


def latent_dict(raw_latents: torch.Tensor) -> dict:
    """LATENT in ComfyUI's convention: raw VAE space, float32, CPU."""
    return {"samples": raw_latents.float().cpu()}
