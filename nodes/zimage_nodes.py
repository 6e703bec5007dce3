"""Z-Image-Turbo nodes: loader, text encode, sampler, the progressive recipe in one node, LoRA (thin glue).

LATENT outputs are raw FLUX.1-VAE latents, so ComfyUI's LatentUpscale / LatentUpscaleBy / VAEDecode sit
between and after EditKit's Z-Image samplers; the one-node recipe runs the same code as that graph.
"""

from __future__ import annotations

import logging

from ..pipelines.core import sampling as core
from ..pipelines.core.errors import EditKitError
from ..pipelines.core.images import nchw_to_image
from ..pipelines.flux import vae as vae_ops
from ..pipelines.zimage.api import encode_prompts
from ..pipelines.zimage.family import FAMILY
from ..pipelines.zimage.latents import UPSCALE_METHODS
from ..pipelines.zimage.loading import ZImageModel
from ..pipelines.zimage.progressive import run_progressive, sample_stage
from ..pipelines.zimage.recipe import DEFAULT_STAGES_YAML, parse_recipe
from ..pipelines.zimage.sampler import check_size
from ..pipelines.zimage.text import make_conditioning, read_conditioning
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
from .family_loader import WEIGHT_DTYPES, FileInput, FolderInput, LoaderDeclaration, declared_loader, dtype_input
from .lora_nodes import lora_node_class

log = logging.getLogger("EditKit")

CATEGORY = "EditKit/z-image"
DTYPES = WEIGHT_DTYPES
MODEL_TYPE = "EDITKIT_ZIMAGE"
TEXT_TYPE = "EDITKIT_ZIMAGE_TEXT"
VAE_TYPE = "EDITKIT_VAE"
LOADER = LoaderDeclaration(
    family=FAMILY,
    folder=FolderInput(
        tooltip="Optional Z-Image diffusers folder in models/diffusers (Tongyi-MAI/Z-Image-Turbo). (none): "
                "everything comes from the single files below, the tokenizer from ComfyUI.",
        what="a Z-Image diffusers folder (every file of the Hugging Face repository Tongyi-MAI/Z-Image-Turbo)",
        pipelines=FAMILY.pipelines,  # never another model's folder
    ),
    files={
        "transformer_file": FileInput(
            "diffusion_models",
            "Z-Image transformer from models/diffusion_models: z_image_turbo_bf16.safetensors (ComfyUI's file) or "
            "a .gguf. Replaces the folder's transformer.",
            "the Z-Image-Turbo transformer: z_image_turbo_bf16.safetensors (Hugging Face Comfy-Org/z_image_turbo) "
            "or a .gguf", "transformer", extensions="TRANSFORMER_EXTENSIONS"),
        "text_encoder_file": FileInput(
            "text_encoders",
            "Qwen3-4B text encoder from models/text_encoders: qwen_3_4b.safetensors. (FLUX.1's clip_l / t5xxl do "
            "not work here.)",
            "Qwen3-4B: qwen_3_4b.safetensors (Hugging Face Comfy-Org/z_image_turbo)", "text_encoder"),
        "vae_file": FileInput(
            "vae", "FLUX.1 VAE from models/vae: ae.safetensors (Z-Image uses FLUX.1's VAE).",
            "the FLUX.1 VAE: ae.safetensors (Hugging Face Comfy-Org/z_image_turbo)", "vae"),
    },
    options={"weight_dtype": dtype_input(
        "Compute dtype of the transformer and text encoder. auto: bf16 on CUDA GPUs that support it (else fp16), "
        "fp32 on the CPU; ComfyUI's precision flags apply. The VAE is never fp16. GGUF weights stay quantized "
        "whatever this says.")},
    optional={"compile": compile_input()},
)
FILES = LOADER.checks


class EditKitZImageLoader(declared_loader(LOADER)):
    DISPLAY_NAME = "EditKit · Z-Image Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads Z-Image-Turbo from ComfyUI's single files (z_image_turbo_bf16.safetensors or a .gguf in "
        "models/diffusion_models, qwen_3_4b.safetensors in models/text_encoders, FLUX.1's ae.safetensors in "
        "models/vae), from the diffusers folder models/diffusers/Z-Image-Turbo, or a mix: a chosen file replaces "
        "the folder's component. Nothing is read until a node uses an output. GGUF weights stay quantized."
    )
    RETURN_TYPES = (MODEL_TYPE, TEXT_TYPE, VAE_TYPE)
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = (
        "The Z-Image transformer, for EditKit · Z-Image Sampler / Progressive and Z-Image LoRA.",
        "Qwen3-4B with its tokenizer, for EditKit · Z-Image Text Encode and Progressive.",
        "The FLUX.1 VAE (Z-Image's), for the Z-Image samplers.",
    )

    def load(self, diffusers_folder, transformer_file, text_encoder_file, vae_file, weight_dtype="auto", compile="auto"):
        parts = self.parts(diffusers_folder, transformer_file, vae_file, weight_dtype, compile)
        text = self.text_encoder(parts, text_encoder_file)
        return (ZImageModel(parts.transformer, parts.scheduler_config), text, parts.vae)


class EditKitZImageTextEncode(PromptPairEncode):
    DISPLAY_NAME = "EditKit · Z-Image Text Encode"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Encodes a prompt and a negative prompt with Qwen3-4B in Z-Image's chat format (as diffusers' "
        "ZImagePipeline does) into CONDITIONING for the Z-Image samplers. Encodings are cached per prompt."
    )
    OUTPUT_TOOLTIPS = ("The prompt's Qwen3 features.",
                       "The negative prompt's features (used only when the sampler's cfg is not 1).")
    TEXT_TYPE = TEXT_TYPE
    TEXT_TOOLTIP = "From EditKit · Z-Image Loader."
    PROMPT_TOOLTIP = "What the picture should show (any language Qwen3 reads)."
    NEGATIVE_TOOLTIP = "What to steer away from when cfg is above 1. Empty is what diffusers uses."
    EMPTY_PROMPT = "The prompt is empty. Describe the picture to generate."
    conditioning = staticmethod(make_conditioning)

    def encode_pair(self, text_encoder, prompt, negative_prompt, runtime):
        captions, negative = encode_prompts(text_encoder, prompt, negative_prompt, runtime)
        return captions[0], negative[0]


CFG_TOOLTIP = (
    "Classifier-free guidance as KSampler's cfg: 1.0 = off (Z-Image-Turbo is distilled and needs none; each step "
    "then costs one model call), above 1 follows the prompt more and away from the negative at two model calls "
    "per step. (diffusers' guidance_scale g is cfg g + 1.)"
)


def _shift_input() -> tuple:
    return ("FLOAT", {"default": 3.0, "min": 0.01, "max": 20.0, "step": 0.1,
                      "tooltip": "Flow shift of the schedule. Z-Image-Turbo uses 3.0; higher spends more steps at "
                                 "high noise (composition), lower at low noise (detail)."})


def _hidden_links(prompt, unique_id, slot: int) -> bool:
    """Whether output ``slot`` of this node is connected in the running ComfyUI prompt."""
    if not isinstance(prompt, dict) or unique_id is None:
        return False
    return any(isinstance(v, list) and len(v) == 2 and str(v[0]) == str(unique_id) and v[1] == slot
               for node in prompt.values() for v in node.get("inputs", {}).values())


class EditKitZImageSampler:
    DISPLAY_NAME = "EditKit · Z-Image Text to Image Sampler"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Samples Z-Image-Turbo: text-to-image, or img2img from a LATENT (e.g. after ComfyUI's LatentUpscale). "
        "Outputs a raw FLUX.1-VAE LATENT that native LatentUpscale / LatentUpscaleBy / VAEDecode accept, and the "
        "picture when 'decode' is on. Chain samplers with latent upscales between them for progressive "
        "generation (the zimage_progressive_nodes workflow)."
    )
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "image")
    OUTPUT_TOOLTIPS = ("The generated latent (raw FLUX.1-VAE space).",
                       "The decoded picture (only with decode on; leave unconnected otherwise).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From EditKit · Z-Image Loader (or Z-Image LoRA)."}),
                "vae": (VAE_TYPE, {"tooltip": "FLUX.1 VAE from EditKit · Z-Image Loader."}),
                "positive": ("CONDITIONING", {"tooltip": "From EditKit · Z-Image Text Encode."}),
                "width": ("INT", {"default": 672, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Picture width (multiple of 16). Ignored when a latent is connected."}),
                "height": ("INT", {"default": 864, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Picture height (multiple of 16). Ignored when a latent is connected."}),
                "seed": seed_input(),
                "steps": steps_input(9),
                "cfg": cfg_input(CFG_TOOLTIP),
                "sampler": sampler_input(),
                "shift": _shift_input(),
                "denoise": partial_denoise_input("How much of the latent to repaint (img2img); 1.0 = from pure "
                                                 "noise. Read as 'denoise_convention' says."),
                "denoise_convention": convention_input(),
                "batch_size": batch_input(),
                "decode": ("BOOLEAN", {"default": True,
                                       "tooltip": "Decode the result to the 'image' output. Off between progressive "
                                                  "stages (only the latent goes on)."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt, used when cfg is not 1."}),
                "latent": ("LATENT", {"tooltip": "Start from this latent (img2img) instead of noise; its size "
                                                 "decides the picture size."}),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, vae, positive, width, height, seed, steps, cfg, sampler, shift, denoise,
               denoise_convention, batch_size, decode=True, negative=None, latent=None, prompt=None, unique_id=None):
        if not decode and _hidden_links(prompt, unique_id, 1):
            raise EditKitError("The 'image' output is connected but 'decode' is off. Switch decode on, or decode "
                               "the latent with a VAE Decode node.")
        init = None
        if latent is not None:
            init = vae_ops.read_latent(latent["samples"])
        else:
            check_size(width, height)
        core.check_partial(denoise, denoise_convention)
        core.SamplerSettings(name=sampler)  # an unknown sampler name fails here, before loading
        transformer = model.transformer.get()
        width_model = int(transformer.module.config.cap_feat_dim)
        captions = read_conditioning(positive, width_model)
        uncond = None if negative is None else read_conditioning(negative, width_model, "negative")
        if uncond is None and cfg != 1.0:
            raise EditKitError(f"cfg is {cfg} but no negative CONDITIONING is connected. Connect the 'negative' "
                               "output of EditKit · Z-Image Text Encode (an empty negative prompt is what diffusers "
                               "uses), or set cfg to 1.")
        runtime = bridge.runtime()
        vae_component = vae.get()
        raw = sample_stage(
            transformer, vae_component, model.scheduler_config, captions, uncond, runtime, width=width, height=height,
            seed=seed, steps=steps, cfg=cfg, sampler=sampler, shift=shift, denoise=denoise,
            convention=denoise_convention, batch_size=batch_size,
            init_raw=None if init is None else init.to(vae_component.device),
        )
        image = None
        if decode:
            pixels = vae_ops.decode(vae_component, vae_ops.raw_to_model(vae_component, raw), runtime)
            image = nchw_to_image(pixels).to(runtime.intermediate_device)
        return latent_dict(raw), image


class EditKitZImageProgressive:
    DISPLAY_NAME = "EditKit · Z-Image Progressive Upscale"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "The whole progressive recipe in one node: a small picture fixes the composition, then the latent is "
        "resized (nearest-exact) and refined with img2img, as often as the stages say. The prompt is encoded once, "
        "nothing is decoded between stages, and the result equals the same chain of Z-Image Samplers and "
        "LatentUpscale nodes. Every stage is checked before anything runs. One stage = plain text-to-image."
    )
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "LATENT", "IMAGE")
    RETURN_NAMES = ("image", "latent", "stages")
    OUTPUT_TOOLTIPS = (
        "The final picture(s).",
        "The final latent (raw FLUX.1-VAE space).",
        "Every stage's picture, resized to the final size, as one batch (stage 1 first), for inspection.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From EditKit · Z-Image Loader (or Z-Image LoRA)."}),
                "text_encoder": (TEXT_TYPE, {"tooltip": "From EditKit · Z-Image Loader."}),
                "vae": (VAE_TYPE, {"tooltip": "FLUX.1 VAE from EditKit · Z-Image Loader."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                      "tooltip": "What the picture should show (add a LoRA's trigger word here)."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Used by stages whose guidance_scale turns CFG on."}),
                "seed": seed_input("Seed of stage 1; stage k uses seed + k - 1 (as the modular workflow's samplers)."),
                "stages": ("STRING", {
                    "multiline": True, "default": DEFAULT_STAGES_YAML,
                    "tooltip": "The stages as YAML: progressive_stages: stage1: {height, width, num_inference_steps, "
                               "guidance_scale}, stage2: {..., strength} (or scale_by instead of width/height), any "
                               "number of stages. Checked before anything runs; see docs/zimage.md.",
                }),
                "upscale_method": (list(UPSCALE_METHODS), {
                    "default": "nearest-exact",
                    "tooltip": "How the latent is resized between stages (ComfyUI's LatentUpscale methods).",
                }),
                "batch_size": batch_input(),
                "decode_stages": ("BOOLEAN", {"default": True,
                                              "tooltip": "Also decode every earlier stage for the 'stages' output "
                                                         "(after the last stage; costs one small decode each)."}),
            }
        }

    def generate(self, model, text_encoder, vae, prompt, negative_prompt, seed, stages, upscale_method, batch_size,
                 decode_stages=True):
        recipe = parse_recipe(stages)  # every stage is checked before any model is touched
        if not prompt.strip():
            raise EditKitError("The prompt is empty. Describe the picture to generate.")
        runtime = bridge.runtime()
        needs_negative = any(s.cfg != 1.0 for s in recipe.stages)
        captions, negative = encode_prompts(text_encoder, prompt, negative_prompt if needs_negative else None,
                                            runtime)
        transformer = model.transformer.get()
        read_conditioning(make_conditioning(captions[0]), int(transformer.module.config.cap_feat_dim))
        result = run_progressive(
            transformer, vae.get(), model.scheduler_config, captions, negative, recipe, seed, runtime,
            batch_size=batch_size, upscale_method=upscale_method, decode_stages=decode_stages,
        )
        device = runtime.intermediate_device
        image = nchw_to_image(result.image).to(device)
        stage_images = image if result.stage_images is None else nchw_to_image(result.stage_images).to(device)
        return image, latent_dict(result.latent), stage_images


EditKitZImageLora = lora_node_class(
    FAMILY.lora, MODEL_TYPE, class_name="EditKitZImageLora", display_name="EditKit · Z-Image LoRA",
    category=CATEGORY, family_models="Z-Image",
)

NODES = [EditKitZImageLoader, EditKitZImageTextEncode, EditKitZImageSampler, EditKitZImageProgressive,
         EditKitZImageLora]
