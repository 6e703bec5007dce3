"""Kontext-inpaint nodes: loader (or on-the-fly widening), single edit, multi-round edit."""

from __future__ import annotations

import logging

import torch

from ..pipelines.core.errors import EditKitError
from ..pipelines.core.images import (
    check_multiple_of,
    check_not_load_image_empty_mask,
    image_to_nchw,
    mask_to_nchw,
    nchw_to_image,
    repeat_batch,
)
from ..pipelines.flux import kontext_inpaint as ki
from ..pipelines.flux import vae as vae_ops
from ..pipelines.flux.conditioning import FluxText
from ..pipelines.flux.loading import FluxModel
from ..pipelines.flux.text import DEFAULT_T5_LENGTH
from . import comfy_bridge as bridge
from .common import batch_input, denoise_input, flux_text, guidance_input, latent_dict, seed_input, steps_input
from .flux_nodes import EditKitFluxLoader

log = logging.getLogger("EditKit")

CATEGORY = "EditKit/kontext-inpaint"
# Its own socket type, so the UI never lets a 192-feature model reach a FLUX.1-Fill sampler (or the reverse).
MODEL_TYPE = "EDITKIT_KONTEXT_INPAINT"
# Set on a transformer widened from FLUX.1-Fill in this session (value: the widen_init used).
UNTRAINED_WIDENING = "untrained_widening"
UNTRAINED_WARNING = (
    "EditKit Kontext-inpaint: '%s' is FLUX.1-Fill widened on the fly and NOT trained: it returns the source "
    "picture (exactly with widen_init zeros, nearly with small_random; this one: %s), whatever the instruction says. Pick a trained Kontext-inpaint transformer in the "
    "loader's transformer_file (see the README's training section)."
)


def _as_kontext(component, init: str):
    """Widen a FLUX.1-Fill transformer; pass a trained 192-feature one through unchanged."""
    widened = component.module.config.in_channels != ki.KONTEXT_IN_FEATURES
    ki.ensure_kontext(component.module, component.name, init=init)
    if widened:
        component.name = f"{component.name} (widened for Kontext-inpaint)"
        component.extras[UNTRAINED_WIDENING] = init
    return component


def _warn_if_untrained(transformer) -> None:
    """Log a warning on every run with an untrained widening (the loader's output is cached by
    ComfyUI, so a warning there would show once and then never again)."""
    init = transformer.extras.get(UNTRAINED_WIDENING)
    if init is not None:
        log.warning(UNTRAINED_WARNING, transformer.name, init)


class EditKitKontextInpaintLoader:
    DISPLAY_NAME = "EditKit · Kontext-inpaint Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads a Kontext-inpaint transformer (192 input features: noisy latent + source latent + mask-image "
        "latent) from a diffusers folder or one .safetensors/.gguf file, with the FLUX.1 text encoders and VAE. "
        "Given FLUX.1-Fill-dev instead (what a FLUX.1-Fill-dev folder holds, so the default choice), it widens "
        "Fill on the fly: the new mask-image channels start silent, so that UNTRAINED model RETURNS THE SOURCE "
        "PICTURE unchanged until it is fine-tuned (see the README's training section); every edit with it logs "
        "a warning."
    )
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPE, *EditKitFluxLoader.RETURN_TYPES[1:])
    RETURN_NAMES = EditKitFluxLoader.RETURN_NAMES
    OUTPUT_TOOLTIPS = (
        "The Kontext-inpaint transformer (trained, or Fill widened on the fly: untrained, returns the source).",
        "CLIP-L + T5-XXL, for EditKit · Flux Text Encode and multi-round edits.",
        "The FLUX.1 VAE.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        spec = EditKitFluxLoader.INPUT_TYPES()
        spec["required"]["transformer_file"][1]["tooltip"] = (
            "A trained Kontext-inpaint transformer (.safetensors in BFL layout, as EditKit's trainer saves, or "
            ".gguf). Replaces the folder's transformer. Warning: (from folder) with a FLUX.1-Fill-dev folder, or "
            "flux1-fill-dev itself, is widened on the fly and is untrained: edits return the source picture."
        )
        spec.setdefault("optional", {})["widen_init"] = (list(ki.widen.INIT_CHOICES), {
            "default": "zeros",
            "tooltip": "Only when widening FLUX.1-Fill (untrained: edits return the source picture): start the "
                       "new mask-image channels at zero (exactly the source) or at small random values (nearly "
                       "the source; for A/B experiments before training).",
        })
        return spec

    IS_CHANGED = EditKitFluxLoader.IS_CHANGED
    VALIDATE_INPUTS = EditKitFluxLoader.VALIDATE_INPUTS

    def load(self, widen_init="zeros", **files):
        model, text, vae = EditKitFluxLoader().load(**files)
        transformer = model.transformer.derived(
            f"kontext-inpaint/{widen_init}", lambda c: _as_kontext(c, widen_init),
            "Kontext-inpaint transformer",
        )
        return (FluxModel(transformer, model.scheduler_config), text, vae)


def _encode_references(vae, reference, runtime) -> list[torch.Tensor] | None:
    if reference is None:
        return None
    pixels = image_to_nchw(reference)
    check_multiple_of(pixels.shape[-2], pixels.shape[-1], 16, "Reference image")
    latents = vae_ops.encode(vae, pixels, runtime)
    return [latents[i:i + 1] for i in range(latents.shape[0])]


def _check_source(image, source_latent) -> None:
    """Validate the source before any model is loaded, so a wrong input fails in a second, not after 24 GB."""
    if source_latent is not None:
        samples = source_latent["samples"]
        if samples.ndim != 4 or samples.shape[1] != 16:
            raise EditKitError(
                f"source_latent has shape {tuple(samples.shape)}; Kontext-inpaint needs a FLUX.1 LATENT "
                "[batch, 16, height/8, width/8] (from an EditKit Flux/Kontext node or VAEEncode with the FLUX.1 VAE)."
            )
        if samples.shape[-2] % 2 or samples.shape[-1] % 2:
            raise EditKitError("source_latent must be a multiple of 16 pixels wide and high (2 latent pixels).")
    elif image is None:
        raise EditKitError("Connect a source: an IMAGE (image) or a LATENT (source_latent, e.g. a previous edit).")
    else:
        pixels = image_to_nchw(image)
        check_multiple_of(pixels.shape[-2], pixels.shape[-1], 16, "Source image")


def _source_latent(vae, image, source_latent, runtime) -> torch.Tensor:
    if source_latent is not None:
        return vae_ops.raw_to_model(vae, vae_ops.read_latent(source_latent["samples"], "source_latent"))
    return vae_ops.encode(vae, image_to_nchw(image), runtime)


def _mask(mask):
    return None if mask is None else mask_to_nchw(mask)


def _check_mask(mask, image, source_latent) -> None:
    """Before any model loads: Load Image's empty placeholder mask gets its own clear error."""
    if mask is None:
        return
    if source_latent is not None:
        height, width = (8 * n for n in source_latent["samples"].shape[-2:])
    else:
        height, width = image_to_nchw(image).shape[-2:]
    check_not_load_image_empty_mask(mask_to_nchw(mask), height, width)


_MODEL_INPUTS = {
    "model": (MODEL_TYPE, {"tooltip": "From EditKit · Kontext-inpaint Loader."}),
    "vae": ("EDITKIT_VAE", {"tooltip": "FLUX.1 VAE from the loader."}),
}

_COMMON_OPTIONAL = {
    "mask": ("MASK", {"tooltip": "Optional: 1 (white) where the edit may change the picture. Unconnected: "
                                 "anything may change (a pure white mask picture)."}),
    "reference": ("IMAGE", {"tooltip": "Optional Kontext-style reference picture(s), appended as extra tokens. "
                                       "Leave unconnected unless your model was trained with references."}),
}


class EditKitKontextInpaintEdit:
    DISPLAY_NAME = "EditKit · Kontext-inpaint Edit"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Edits a picture from an instruction with a Kontext-inpaint model: the source latent and the latent of a "
        "white mask picture condition every token, so no hand-drawn mask is needed. Give a MASK to restrict where "
        "it may change. Chain edits in latent space by feeding the LATENT output to the next edit's source_latent."
    )
    FUNCTION = "edit"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = ("The edited pictures.", "The edited latents (raw VAE space), e.g. for the next edit.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_MODEL_INPUTS,
                "conditioning": ("CONDITIONING", {"tooltip": "The edit instruction (EditKit · Flux Text Encode "
                                                             "or native CLIPTextEncode)."}),
                "seed": seed_input(),
                "steps": steps_input(),
                "guidance": guidance_input(),
                "denoise": denoise_input(),
                "batch_size": batch_input(),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "Source picture (multiples of 16 px). Ignored when source_latent "
                                               "is connected."}),
                "source_latent": ("LATENT", {"tooltip": "Source as a LATENT (raw VAE space), e.g. the previous "
                                                        "edit's output: chains edits without VAE loss."}),
                **_COMMON_OPTIONAL,
            },
        }

    def edit(self, model, vae, conditioning, seed, steps, guidance, denoise, batch_size, image=None,
             source_latent=None, mask=None, reference=None):
        runtime = bridge.runtime()
        _check_source(image, source_latent)
        _check_mask(mask, image, source_latent)
        vae_c = vae.get()
        source = _source_latent(vae_c, image, source_latent, runtime)
        sources = source.shape[0]
        source = repeat_batch(source, batch_size)
        b, _, h, w = source.shape
        mask_t = _mask(mask)
        if mask_t is not None and mask_t.shape[0] == sources and sources > 1:
            mask_t = repeat_batch(mask_t, batch_size)
        mask_latent = ki.mask_image_latent(vae_c, mask_t, b, h * 8, w * 8, runtime)
        transformer = model.transformer.get()
        _warn_if_untrained(transformer)
        text, guidance = flux_text(conditioning, transformer.module.config, guidance)
        if text.states.shape[0] == sources and sources > 1:
            text = FluxText(repeat_batch(text.states, batch_size), repeat_batch(text.pooled, batch_size), None)
        result = ki.edit(
            transformer, source, mask_latent, text, steps=steps, guidance=guidance, seed=seed, denoise=denoise,
            scheduler_config=model.scheduler_config, runtime=runtime,
            references=_encode_references(vae_c, reference, runtime),
        )
        images = vae_ops.decode(vae_c, result.latents, runtime).to(runtime.intermediate_device)
        return nchw_to_image(images), latent_dict(vae_ops.model_to_raw(vae_c, result.latents))


class EditKitKontextInpaintMultiRound:
    DISPLAY_NAME = "EditKit · Kontext-inpaint Multi-round"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Applies several edit instructions one after another (one per line). Round k edits round k-1's output "
        "latent directly (no VAE decode/encode between rounds, so no VAE loss accumulates) with seed + k - 1. "
        "Outputs the final picture, every round's picture as one batch, and the final latent."
    )
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "IMAGE", "LATENT")
    RETURN_NAMES = ("image", "history", "latent")
    OUTPUT_TOOLTIPS = (
        "The picture after the last round.",
        "One picture per round, in order (for several sources: all sources of round 1, then of round 2, ...).",
        "The last round's latent (raw VAE space).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_MODEL_INPUTS,
                "text_encoders": ("EDITKIT_FLUX_TEXT", {"tooltip": "From the loader; encodes each instruction."}),
                "image": ("IMAGE", {"tooltip": "Source picture (multiples of 16 px)."}),
                "instructions": ("STRING", {"multiline": True, "default": "",
                                            "tooltip": "One edit instruction per line, applied in order. Empty "
                                                       "lines are skipped."}),
                "seed": seed_input("Seed of round 1; round k uses seed + k - 1."),
                "steps": steps_input(),
                "guidance": guidance_input(),
                "denoise": denoise_input(),
            },
            "optional": {
                **_COMMON_OPTIONAL,
                "max_sequence_length": ("INT", {"default": DEFAULT_T5_LENGTH, "min": 64, "max": 512, "step": 64,
                                                "tooltip": "T5 token length per instruction."}),
            },
        }

    def run(self, model, vae, text_encoders, image, instructions, seed, steps, guidance, denoise, mask=None,
            reference=None, max_sequence_length=DEFAULT_T5_LENGTH):
        runtime = bridge.runtime()
        lines = [line.strip() for line in instructions.splitlines() if line.strip()]
        if not lines:
            raise EditKitError("No instructions: write one edit instruction per line.")
        _check_source(image, None)
        _check_mask(mask, image, None)
        encoders = text_encoders.get()
        transformer = model.transformer.get()
        _warn_if_untrained(transformer)
        config = transformer.module.config
        texts = []
        for line in lines:
            states, pooled = encoders.encode([line], runtime, max_sequence_length)
            texts.append(flux_text([[states, {"pooled_output": pooled}]], config, guidance)[0])
        vae_c = vae.get()
        source = _source_latent(vae_c, image, None, runtime)
        b, _, h, w = source.shape
        mask_latent = ki.mask_image_latent(vae_c, _mask(mask), b, h * 8, w * 8, runtime)
        history = ki.multi_round(
            transformer, source, mask_latent, texts, steps=steps, guidance=guidance, seed=seed, denoise=denoise,
            scheduler_config=model.scheduler_config, runtime=runtime,
            references=_encode_references(vae_c, reference, runtime),
        )
        stacked = torch.cat(history)
        pictures = nchw_to_image(vae_ops.decode(vae_c, stacked, runtime).to(runtime.intermediate_device))
        return pictures[-b:], pictures, latent_dict(vae_ops.model_to_raw(vae_c, history[-1]))


NODES = [EditKitKontextInpaintLoader, EditKitKontextInpaintEdit, EditKitKontextInpaintMultiRound]
