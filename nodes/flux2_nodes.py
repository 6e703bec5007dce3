"""FLUX.2 [klein] nodes: loader, text encode, sampler (text-to-image and edit with references), inpaint, LoRA.

Thin glue over ``pipelines.flux2``. LATENT outputs are raw FLUX.2-VAE latents ``[B, 32, H/8, W/8]``.
"""

from __future__ import annotations

import logging

import torch

from ..pipelines.core import sampling as core
from ..pipelines.core.errors import EditKitError
from ..pipelines.core.images import image_to_nchw, mask_to_nchw, nchw_to_image
from ..pipelines.flux2 import latent as fl
from ..pipelines.flux2.family import FAMILY
from ..pipelines.flux2.inpaint import inpaint
from ..pipelines.flux2.loading import Flux2Model, is_distilled
from ..pipelines.flux2.sampler import fit_reference, generate
from ..pipelines.flux2.text import make_conditioning, read_conditioning
from ..pipelines.flux2.vae import decode_raw
from . import comfy_bridge as bridge
from .common import (
    PromptPairEncode,
    batch_input,
    cfg_input,
    compile_input,
    convention_input,
    latent_dict,
    partial_denoise_input,
    sampler_input,
    seed_input,
    steps_input,
)
from .family_loader import FileInput, FolderInput, LoaderDeclaration, declared_loader, dtype_input
from .lora_nodes import lora_node_class

log = logging.getLogger("EditKit")

CATEGORY = "EditKit/flux2"
MODEL_TYPE = "EDITKIT_FLUX2"
TEXT_TYPE = "EDITKIT_FLUX2_TEXT"
VAE_TYPE = "EDITKIT_FLUX2_VAE"
IMAGE_SLOTS = 4
FROM_IMAGE_1 = "from image_1"
FROM_WIDGETS = "width and height"
LOADER = LoaderDeclaration(
    family=FAMILY,
    folder=FolderInput(
        tooltip="Optional FLUX.2 [klein] diffusers folder in models/diffusers (e.g. black-forest-labs/FLUX.2-klein-4B). "
                "(none): everything comes from the single files below, the tokenizer from ComfyUI.",
        what="a FLUX.2 [klein] diffusers folder (every file of black-forest-labs/FLUX.2-klein-4B or -9B)",
        pipelines=FAMILY.pipelines,  # never another model's folder
    ),
    files={
        "transformer_file": FileInput(
            "diffusion_models",
            "FLUX.2 [klein] transformer from models/diffusion_models: flux-2-klein-4b.safetensors (BFL/ComfyUI "
            "layout), a diffusers-layout file, or a .gguf. Replaces the folder's.",
            "a FLUX.2 [klein] transformer: flux-2-klein-4b.safetensors (Hugging Face Comfy-Org/flux2-klein) or a "
            ".gguf", "transformer", extensions="TRANSFORMER_EXTENSIONS"),
        "text_encoder_file": FileInput(
            "text_encoders",
            "Qwen3 text encoder from models/text_encoders: qwen_3_4b.safetensors for klein 4B (the same file Z-Image "
            "uses), a Qwen3-8B file for klein 9B.",
            "Qwen3-4B for klein 4B: qwen_3_4b.safetensors (Hugging Face Comfy-Org/flux2-klein); Qwen3-8B for klein "
            "9B", "text_encoder"),
        "vae_file": FileInput(
            "vae", "FLUX.2 VAE from models/vae: flux2-vae.safetensors (FLUX.1's ae.safetensors does not fit: FLUX.2 "
                   "has 32 latent channels).",
            "the FLUX.2 VAE: flux2-vae.safetensors (Hugging Face Comfy-Org/flux2-klein)", "vae"),
    },
    options={"weight_dtype": dtype_input(
        "Compute dtype of the transformer and text encoder. auto: bf16 on CUDA GPUs that support it (else fp16), "
        "fp32 on the CPU; ComfyUI's precision flags apply. GGUF weights stay quantized whatever this says.")},
    optional={"compile": compile_input()},
)
FILES = LOADER.checks


class EditKitFlux2Loader(declared_loader(LOADER)):
    DISPLAY_NAME = "EditKit · FLUX.2 Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads FLUX.2 [klein] (4B or 9B, distilled or base) from ComfyUI's single files (the transformer as "
        ".safetensors in BFL/ComfyUI layout or .gguf in models/diffusion_models, Qwen3 in models/text_encoders, "
        "flux2-vae.safetensors in models/vae), from a diffusers folder in models/diffusers, or a mix: a chosen file "
        "replaces the folder's component. The model's size is read from the file. Nothing is read until a node "
        "uses an output; GGUF weights stay quantized."
    )
    RETURN_TYPES = (MODEL_TYPE, TEXT_TYPE, VAE_TYPE)
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = (
        "The FLUX.2 transformer, for EditKit · FLUX.2 Sampler / Inpaint and FLUX.2 LoRA.",
        "Qwen3 with its tokenizer, for EditKit · FLUX.2 Text Encode.",
        "The FLUX.2 VAE (32 latent channels), for the FLUX.2 samplers.",
    )

    def load(self, diffusers_folder, transformer_file, text_encoder_file, vae_file, weight_dtype="auto", compile="auto"):
        parts = self.parts(diffusers_folder, transformer_file, vae_file, weight_dtype, compile)
        text = self.text_encoder(parts, text_encoder_file)
        return (Flux2Model(parts.transformer, parts.scheduler_config, is_distilled(parts.folder)), text, parts.vae)


class EditKitFlux2TextEncode(PromptPairEncode):
    DISPLAY_NAME = "EditKit · FLUX.2 Text Encode"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Encodes a prompt (and a negative prompt) with Qwen3 the way FLUX.2 [klein] reads it: 512 tokens, three "
        "hidden layers stacked, as diffusers' Flux2KleinPipeline does. Encodings are cached per prompt."
    )
    OUTPUT_TOOLTIPS = ("The prompt's features.",
                       "The negative prompt's features (used only when the sampler's cfg is not 1).")
    TEXT_TYPE = TEXT_TYPE
    TEXT_TOOLTIP = "From EditKit · FLUX.2 Loader."
    PROMPT_TOOLTIP = ("What to make or how to change the reference pictures ('put the cat from image 2 on the sofa "
                      "of image 1').")
    NEGATIVE_TOOLTIP = "For the base (non-distilled) models with cfg above 1. Empty is what diffusers uses."
    EMPTY_PROMPT = "The prompt is empty. Describe the picture to make or the edit to do."
    conditioning = staticmethod(make_conditioning)

    def encode_pair(self, text_encoder, prompt, negative_prompt, runtime):
        encoder = text_encoder.get()
        return encoder.encode(prompt, runtime), encoder.encode(negative_prompt, runtime)


CFG_TOOLTIP = (
    "Classifier-free guidance (diffusers' guidance_scale). 1.0 = off: the published klein 4B/9B are step-distilled "
    "and need none (4 steps). The base models use about 4 with ~50 steps and a negative prompt (two model calls per "
    "step)."
)


def _reference_inputs() -> dict:
    slots = {f"image_{i}": ("IMAGE", {"tooltip": f"Reference picture {i} ('image {i}' in the prompt). Larger than "
                                                 "max_reference_megapixels: scaled down; sides are cropped to "
                                                 "multiples of 16."})
             for i in range(1, IMAGE_SLOTS + 1)}
    slots["references"] = ("IMAGE", {"tooltip": "More reference pictures as a batch, after the image_N inputs; any "
                                                 "count. ComfyUI's Batch Images resizes every picture to the first "
                                                 "one's size: connect pictures of other shapes to image_N instead."})
    return slots


def _pictures(images: list, references, max_megapixels: float) -> list[torch.Tensor]:
    """Every connected reference picture, in order, each ``[1, 3, H, W]`` fitted for the model."""
    pictures = []
    for index, image in enumerate(images, start=1):
        if image is None:
            continue
        batch = image_to_nchw(image)
        if batch.shape[0] != 1:
            raise EditKitError(f"image_{index} holds {batch.shape[0]} pictures; connect one picture per image_N "
                               "input, or a batch to 'references' (a batch there is several references).")
        pictures.append(batch)
    if references is not None:
        batch = image_to_nchw(references)
        if batch.shape[0] == 0:
            raise EditKitError("'references' got an empty batch: connect one or more pictures, or disconnect it.")
        pictures += list(batch.split(1))
    limit = int(max_megapixels * 1024 * 1024)
    return [fit_reference(p, limit) for p in pictures]


def _texts(model, positive, negative, cfg: float):
    width = int(model.transformer.get().module.config.joint_attention_dim)
    text = read_conditioning(positive, width)
    uncond = None
    if cfg != 1.0:
        if negative is None:
            raise EditKitError(f"cfg is {cfg} but no negative CONDITIONING is connected. Connect the 'negative' output "
                               "of EditKit · FLUX.2 Text Encode (an empty negative prompt is what diffusers uses), or "
                               "set cfg to 1.")
        if model.distilled:
            log.warning("EditKit: cfg %.2f on a step-distilled FLUX.2 [klein] model; diffusers ignores guidance for "
                        "these (set cfg to 1, or use a klein base model).", cfg)
        uncond = read_conditioning(negative, width, "negative")
    return text, uncond


class EditKitFlux2Sampler:
    DISPLAY_NAME = "EditKit · FLUX.2 Sampler (text to image / edit)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "FLUX.2 [klein]: text-to-image with no picture connected; with pictures connected (image_1.., and any "
        "number more in 'references') an edit that reads all of them, each at its own size. Equal to diffusers' "
        "Flux2KleinPipeline. Outputs the picture and a raw FLUX.2 LATENT."
    )
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = ("The generated or edited picture(s).", "The result as a raw FLUX.2-VAE latent [B, 32, H/8, W/8].")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From EditKit · FLUX.2 Loader (or FLUX.2 LoRA)."}),
                "vae": (VAE_TYPE, {"tooltip": "The FLUX.2 VAE from EditKit · FLUX.2 Loader."}),
                "positive": ("CONDITIONING", {"tooltip": "From EditKit · FLUX.2 Text Encode."}),
                "size": ([FROM_IMAGE_1, FROM_WIDGETS], {
                    "default": FROM_IMAGE_1,
                    "tooltip": "from image_1: the result has the (fitted) size of image_1, as the reference "
                               "pipeline; without image_1 (or with 'width and height') the widgets below decide.",
                }),
                "width": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Result width (multiple of 16) when size says so or no image_1."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Result height (multiple of 16) when size says so or no image_1."}),
                "seed": seed_input(),
                "steps": steps_input(4),
                "cfg": cfg_input(CFG_TOOLTIP),
                "sampler": sampler_input(),
                "denoise": partial_denoise_input("Below 1 needs a 'latent' to start from (img2img); 1 = from noise."),
                "denoise_convention": convention_input(),
                "batch_size": batch_input(),
                "max_reference_megapixels": ("FLOAT", {
                    "default": 1.0, "min": 0.05, "max": 4.0, "step": 0.05,
                    "tooltip": "Reference pictures larger than this are scaled down to it (the reference pipeline "
                               "uses 1.0). More pixels: finer detail read, slower steps.",
                }),
            },
            "optional": {
                **_reference_inputs(),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt, used when cfg is not 1."}),
                "latent": ("LATENT", {"tooltip": "Start from this raw FLUX.2 latent (img2img with denoise < 1); its "
                                                 "size decides the result's size."}),
            },
        }

    def sample(self, model, vae, positive, size=FROM_IMAGE_1, width=1024, height=1024, seed=0, steps=4, cfg=1.0,
               sampler="euler", denoise=1.0, denoise_convention="denoise", batch_size=1, max_reference_megapixels=1.0,
               image_1=None, image_2=None, image_3=None, image_4=None, references=None, negative=None, latent=None):
        core.SamplerSettings(name=sampler)
        core.check_partial(denoise, denoise_convention)
        pictures = _pictures([image_1, image_2, image_3, image_4], references, max_reference_megapixels)
        init = None
        if latent is not None:
            init = fl.read_latent(latent["samples"])
            height, width = init.shape[-2] * fl.VAE_SCALE, init.shape[-1] * fl.VAE_SCALE
        elif size == FROM_IMAGE_1 and image_1 is not None:
            height, width = pictures[0].shape[-2], pictures[0].shape[-1]
        text, uncond = _texts(model, positive, negative, cfg)
        runtime = bridge.runtime()
        vae_component = vae.get()
        raw = generate(model, vae_component, text, runtime, width=width, height=height, seed=seed, steps=steps,
                       batch_size=batch_size, references=pictures, negative=uncond, cfg=cfg, init_raw=init,
                       denoise=denoise, convention=denoise_convention, sampler=sampler)
        pixels = decode_raw(vae_component, raw, runtime)
        return nchw_to_image(pixels).to(runtime.intermediate_device), latent_dict(raw)


class EditKitFlux2Inpaint:
    DISPLAY_NAME = "EditKit · FLUX.2 Inpaint"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "FLUX.2 [klein] inpainting: repaints where the MASK is 1 (ComfyUI's convention; Load Image's painted mask "
        "works as is), reading the picture itself and any reference pictures connected. As diffusers' "
        "Flux2KleinInpaintPipeline, and then blended back with the mask, so every pixel outside it comes back "
        "exactly. A mask that is 0 everywhere returns the picture unchanged."
    )
    FUNCTION = "inpaint"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = ("The inpainted picture(s), exact outside the mask.",
                       "The sampled raw FLUX.2 latent (before the blend-back).")

    @classmethod
    def INPUT_TYPES(cls):
        slots = _reference_inputs()
        del slots["image_4"]
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From EditKit · FLUX.2 Loader (or FLUX.2 LoRA)."}),
                "vae": (VAE_TYPE, {"tooltip": "The FLUX.2 VAE from EditKit · FLUX.2 Loader."}),
                "positive": ("CONDITIONING", {"tooltip": "From EditKit · FLUX.2 Text Encode: what to paint."}),
                "image": ("IMAGE", {"tooltip": "The picture(s) to inpaint; sides must be multiples of 16."}),
                "mask": ("MASK", {"tooltip": "1 = repaint, 0 = keep (exactly). One mask, or one per picture; soft "
                                             "edges blend."}),
                "seed": seed_input(),
                "steps": steps_input(4),
                "cfg": cfg_input(CFG_TOOLTIP),
                "sampler": sampler_input(),
                "denoise": partial_denoise_input("1: the masked area starts from noise; lower keeps more of the "
                                                 "picture's own content there."),
                "denoise_convention": convention_input("strength"),
                "batch_size": batch_input(),
                "max_reference_megapixels": ("FLOAT", {
                    "default": 1.0, "min": 0.05, "max": 4.0, "step": 0.05,
                    "tooltip": "Reference pictures larger than this are scaled down to it.",
                }),
            },
            "optional": {
                **slots,
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt, used when cfg is not 1."}),
            },
        }

    def inpaint(self, model, vae, positive, image, mask, seed=0, steps=4, cfg=1.0, sampler="euler", denoise=1.0,
                denoise_convention="strength", batch_size=1, max_reference_megapixels=1.0, image_1=None, image_2=None,
                image_3=None, references=None, negative=None):
        core.SamplerSettings(name=sampler)
        core.check_partial(denoise, denoise_convention)
        pixels = image_to_nchw(image)
        masks = mask_to_nchw(mask)[:, 0]
        if batch_size > 1:
            pixels = pixels.repeat_interleave(batch_size, dim=0)
            masks = masks.repeat_interleave(batch_size, dim=0) if masks.shape[0] > 1 else masks
        pictures = _pictures([image_1, image_2, image_3], references, max_reference_megapixels)
        text, uncond = _texts(model, positive, negative, cfg)
        runtime = bridge.runtime()
        out, raw = inpaint(model, vae.get(), text, runtime, nchw_to_image(pixels), masks, seed=seed, steps=steps,
                           references=pictures, negative=uncond, cfg=cfg, denoise=denoise,
                           convention=denoise_convention, sampler=sampler)
        return out.to(runtime.intermediate_device), latent_dict(raw)


EditKitFlux2Lora = lora_node_class(
    FAMILY.lora, MODEL_TYPE, class_name="EditKitFlux2Lora", display_name="EditKit · FLUX.2 LoRA",
    category=CATEGORY, family_models="FLUX.2 [klein]",
)

NODES = [EditKitFlux2Loader, EditKitFlux2TextEncode, EditKitFlux2Sampler, EditKitFlux2Inpaint, EditKitFlux2Lora]
