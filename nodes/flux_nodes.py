"""FLUX.1 nodes: loader, text encoder, Fill inpaint and Fill outpaint (thin glue over pipelines/)."""

from __future__ import annotations

from ..pipelines.core.errors import EditKitError
from ..pipelines.core.images import check_multiple_of, image_to_nchw, mask_to_nchw, match_mask_to_images, nchw_to_image
from ..pipelines.flux import fill as fill_ops
from ..pipelines.flux import vae as vae_ops
from ..pipelines.flux.conditioning import make_conditioning
from ..pipelines.flux.family import FAMILY
from ..pipelines.flux.loading import FluxModel
from ..pipelines.flux.text import DEFAULT_T5_LENGTH
from . import comfy_bridge as bridge
from .common import (
    batch_input,
    chosen_file,
    compile_input,
    denoise_input,
    flux_text,
    guidance_input,
    latent_dict,
    seed_input,
    steps_input,
)
from .family_loader import WEIGHT_DTYPES, FileInput, FolderInput, LoaderDeclaration, declared_loader, dtype_input

CATEGORY = "EditKit/flux"
DTYPES = WEIGHT_DTYPES
LOADER = LoaderDeclaration(
    family=FAMILY,
    comfy_compute=True,  # an explicit precision sets the storage; ComfyUI's rule the compute dtype
    folder=FolderInput(
        tooltip="A FLUX.1 diffusers folder in models/diffusers (e.g. FLUX.1-Fill-dev). Choose (none) to load "
                "everything from single files.",
        what="a FLUX.1 diffusers folder (every file of the Hugging Face repository black-forest-labs/FLUX.1-Fill-dev "
             "or FLUX.1-dev)",
        pipelines=FAMILY.pipelines,  # never another model's folder
    ),
    files={
        "transformer_file": FileInput(
            "diffusion_models",
            "Optional single-file transformer from models/diffusion_models (or models/unet): BFL .safetensors such "
            "as flux1-fill-dev.safetensors, or .gguf such as flux1-fill-dev-Q8_0.gguf. Replaces the folder's "
            "transformer.",
            "a FLUX.1 transformer as one file, BFL layout (flux1-fill-dev.safetensors or flux1-dev.safetensors from "
            "Hugging Face Comfy-Org/flux1-dev) or a .gguf", "transformer", extensions="TRANSFORMER_EXTENSIONS"),
        "vae_file": FileInput(
            "vae", "Optional VAE file from models/vae (FLUX.1's ae.safetensors). Replaces the folder's VAE.",
            "the FLUX.1 VAE, ae.safetensors (Hugging Face black-forest-labs/FLUX.1-dev)", "vae"),
        "clip_l_file": FileInput(
            "text_encoders", "Optional CLIP-L file from models/text_encoders (clip_l.safetensors).",
            "CLIP-L, clip_l.safetensors (Hugging Face comfyanonymous/flux_text_encoders)", "text_encoder"),
        "t5_file": FileInput(
            "text_encoders",
            "Optional T5-XXL file from models/text_encoders (t5xxl_fp16.safetensors, fp8 works too). Tokenizers "
            "come from the folder, or from ComfyUI when no folder is chosen.",
            "T5-XXL, t5xxl_fp16.safetensors (Hugging Face comfyanonymous/flux_text_encoders)", "text_encoder_2"),
    },
    options={"weight_dtype": dtype_input(
        "How the transformer and text encoders store their weights. auto follows ComfyUI (its --bf16-unet, "
        "--fp16-text-enc... flags, else bf16 on GPUs that support it and fp32 on the CPU). Arithmetic runs in what "
        "the device is fast at: bf16/fp16 weights on a CPU are computed in fp32 (half the memory, about 20% slower "
        "than fp32; a warning says so). The VAE uses bf16 or fp32 (never fp16: FLUX.1's VAE overflows in it); fp32 "
        "here makes it fp32 too. GGUF weights stay quantized whatever this says.")},
    optional={"compile": compile_input()},
)
FILES = LOADER.checks


class EditKitFluxLoader(declared_loader(LOADER)):
    DISPLAY_NAME = "EditKit · Flux Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads FLUX.1 (e.g. FLUX.1-Fill-dev) from a diffusers folder in models/diffusers, from single files "
        "(transformer .safetensors or .gguf in models/diffusion_models, ae.safetensors in models/vae, clip_l and "
        "t5xxl in models/text_encoders), or a mix: a chosen file replaces the folder's component. Nothing is read "
        "until a node uses an output, so unconnected outputs cost nothing. GGUF weights stay quantized in memory."
    )
    RETURN_TYPES = ("EDITKIT_FLUX", "EDITKIT_FLUX_TEXT", "EDITKIT_VAE")
    RETURN_NAMES = ("model", "text_encoders", "vae")
    OUTPUT_TOOLTIPS = (
        "The FLUX.1 transformer, for EditKit samplers.",
        "CLIP-L + T5-XXL, for EditKit · Flux Text Encode.",
        "The FLUX.1 VAE, for EditKit samplers.",
    )

    def load(self, diffusers_folder, transformer_file, vae_file, clip_l_file, t5_file, weight_dtype="auto", compile="auto"):
        parts = self.parts(diffusers_folder, transformer_file, vae_file, weight_dtype, compile)
        encoders = bridge.precision("text_encoder", parts.requested)
        text = FAMILY.text_encoder(
            parts.folder, chosen_file(clip_l_file, "text_encoders"), chosen_file(t5_file, "text_encoders"),
            encoders.compute, clip_tokenizer_dir=bridge.comfy_tokenizer_dir("clip_l"),
            t5_tokenizer_dir=bridge.comfy_tokenizer_dir("t5"), storage=encoders.storage,
        )
        return (FluxModel(parts.transformer, parts.scheduler_config), text, parts.vae)


class EditKitFluxTextEncode:
    DISPLAY_NAME = "EditKit · Flux Text Encode"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Encodes a prompt with FLUX.1's CLIP-L and T5-XXL into ComfyUI's native Flux CONDITIONING, so it also "
        "works with native nodes (FluxGuidance, ConditioningZeroOut). Encodings are cached per prompt."
    )
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Flux conditioning: T5 states with the CLIP pooled vector.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoders": ("EDITKIT_FLUX_TEXT", {"tooltip": "From EditKit · Flux Loader."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                      "tooltip": "What the result should show."}),
            },
            "optional": {
                "max_sequence_length": ("INT", {
                    "default": DEFAULT_T5_LENGTH, "min": 64, "max": 512, "step": 64,
                    "tooltip": "T5 token length (prompt padded or cut to it). 512 as FLUX.1-Fill's reference; "
                               "256 is faster and what ComfyUI's CLIPTextEncode uses.",
                }),
            },
        }

    def encode(self, text_encoders, prompt, max_sequence_length=DEFAULT_T5_LENGTH):
        states, pooled = text_encoders.get().encode([prompt], bridge.runtime(), max_sequence_length)
        device = bridge.runtime().intermediate_device
        return (make_conditioning(states.to(device), pooled.to(device)),)


_SAMPLER_INPUTS = {
    "model": ("EDITKIT_FLUX", {"tooltip": "FLUX.1-Fill transformer from EditKit · Flux Loader."}),
    "vae": ("EDITKIT_VAE", {"tooltip": "FLUX.1 VAE from EditKit · Flux Loader."}),
    "conditioning": ("CONDITIONING", {
        "tooltip": "Prompt from EditKit · Flux Text Encode, or native CLIPTextEncode (DualCLIPLoader type flux), "
                   "FluxGuidance, ConditioningZeroOut.",
    }),
    "image": ("IMAGE", {"tooltip": "Picture to edit. Width and height must be multiples of 16."}),
}


def _sampler_settings():
    return {
        "seed": seed_input(),
        "steps": steps_input(),
        "guidance": guidance_input(),
        "denoise": denoise_input(),
        "batch_size": batch_input(),
    }


def _fill_parts(model, vae, conditioning, guidance):
    transformer = model.transformer.get()
    text, guidance = flux_text(conditioning, transformer.module.config, guidance)
    return transformer, vae.get(), text, guidance


def _outputs(result, vae_component):
    return nchw_to_image(result.images), latent_dict(vae_ops.model_to_raw(vae_component, result.latents))


_LATENT_TOOLTIP = (
    "The latent of the image output (the blended result, encoded once more), in ComfyUI's raw VAE space: native "
    "VAEDecode on it gives the image output up to the VAE's own loss."
)


class EditKitFluxFillInpaint:
    DISPLAY_NAME = "EditKit · Flux Fill Inpaint"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Repaints the masked part of an image with FLUX.1-Fill from a prompt. The mask is 1 (white) where the "
        "image may change, as ComfyUI's masks are; the result is blended back with the soft mask, so everything "
        "outside it is kept exactly. An empty mask returns the input unchanged."
    )
    FUNCTION = "inpaint"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = (
        "The inpainted images (batch = images x batch_size).",
        _LATENT_TOOLTIP,
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_SAMPLER_INPUTS,
                "mask": ("MASK", {"tooltip": "1 = repaint, 0 = keep. One mask for all images or one per image, "
                                             "same size as the image. Soft values reach the model as they are "
                                             "(ComfyUI's InpaintModelConditioning convention; the picture is "
                                             "blanked where the mask is above 0.5) and blend the result in."}),
                **_sampler_settings(),
            }
        }

    def inpaint(self, model, vae, conditioning, image, mask, seed, steps, guidance, denoise, batch_size):
        pixels = image_to_nchw(image)
        mask = mask_to_nchw(mask)
        # Check the pictures before loading anything: a wrong size should fail in a second, not after 24 GB.
        check_multiple_of(pixels.shape[-2], pixels.shape[-1], 16)
        match_mask_to_images(mask, pixels)
        transformer, vae_component, text, guidance = _fill_parts(model, vae, conditioning, guidance)
        result = fill_ops.fill(
            transformer, vae_component, pixels, mask, text, steps=steps, guidance=guidance, seed=seed,
            denoise=denoise, per_image=batch_size, scheduler_config=model.scheduler_config, runtime=bridge.runtime(),
        )
        return _outputs(result, vae_component)


def _side(tooltip: str) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip": tooltip})


class EditKitFluxFillOutpaint:
    DISPLAY_NAME = "EditKit · Flux Fill Outpaint"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Extends the canvas on any side and fills the new area with FLUX.1-Fill from a prompt. The output is "
        "exactly the picture plus the pixels asked for (FLUX.1's multiple of 16 is handled inside and cropped "
        "off). A feathered band of the original along each extended edge, and only those, is repainted and "
        "blended so the seam disappears; sides that are not extended are returned unchanged."
    )
    FUNCTION = "outpaint"
    RETURN_TYPES = ("IMAGE", "LATENT", "MASK")
    RETURN_NAMES = ("image", "latent", "mask")
    OUTPUT_TOOLTIPS = (
        "The extended images: width + left + right by height + top + bottom.",
        _LATENT_TOOLTIP + " Latent cells are 8x8 pixels, so it covers the canvas rounded up to a multiple of 8.",
        "The outpaint mask used, at the output size (1 = new, between 0 and 1 = the blended band).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_SAMPLER_INPUTS,
                "left": _side("Pixels to add on the left."),
                "top": _side("Pixels to add at the top."),
                "right": _side("Pixels to add on the right."),
                "bottom": _side("Pixels to add at the bottom."),
                "feathering": ("INT", {"default": 24, "min": 0, "max": 512, "step": 1,
                                       "tooltip": "Width in pixels of the band of the original, along each "
                                                  "extended edge only, that is repainted and blended. Limited to "
                                                  "half the picture's width (left/right) or height (top/bottom), "
                                                  "so the middle of the picture is never repainted."}),
                **_sampler_settings(),
            }
        }

    def outpaint(self, model, vae, conditioning, image, left, top, right, bottom, feathering, seed, steps,
                 guidance, denoise, batch_size):
        if left + top + right + bottom == 0:
            raise EditKitError("Nothing to outpaint: set at least one of left, top, right, bottom above 0.")
        pixels = image_to_nchw(image)
        transformer, vae_component, text, guidance = _fill_parts(model, vae, conditioning, guidance)
        result, mask = fill_ops.outpaint(
            transformer, vae_component, pixels, text, left=left, top=top, right=right, bottom=bottom,
            feathering=feathering, steps=steps, guidance=guidance, seed=seed, denoise=denoise, per_image=batch_size,
            scheduler_config=model.scheduler_config, runtime=bridge.runtime(),
        )
        return (*_outputs(result, vae_component), mask[:, 0].float().cpu())


NODES = [EditKitFluxLoader, EditKitFluxTextEncode, EditKitFluxFillInpaint, EditKitFluxFillOutpaint]
