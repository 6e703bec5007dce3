"""Qwen-Image-Edit(-2509, -2511) nodes: loader, the edit, LoRA (thin glue over pipelines/qwen_image)."""

from __future__ import annotations

import logging

import torch

from ..pipelines.core import sampling as core
from ..pipelines.core.errors import EditKitError
from ..pipelines.core.images import image_to_nchw, mask_to_nchw, nchw_to_image
from ..pipelines.qwen_image import latent as qwen_latent
from ..pipelines.qwen_image import sizes
from ..pipelines.qwen_image import vae as vae_ops
from ..pipelines.qwen_image.edit import check_prompt, edit
from ..pipelines.qwen_image.family import FAMILY
from ..pipelines.qwen_image.loading import (
    VARIANTS,
    QwenImageModel,
)
from . import comfy_bridge as bridge
from .common import (
    batch_input,
    compile_input,
    latent_dict,
    sampler_input,
    seed_input,
    steps_input,
)
from .family_loader import FileInput, FolderInput, LoaderDeclaration, declared_loader, dtype_input
from .lora_nodes import lora_node_class

log = logging.getLogger("EditKit")

CATEGORY = "EditKit/qwen-image"
MODEL_TYPE = "EDITKIT_QWEN_IMAGE"
TEXT_TYPE = "EDITKIT_QWEN_IMAGE_TEXT"
VAE_TYPE = "EDITKIT_QWEN_IMAGE_VAE"
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
AUTO_VARIANT = "auto"
MAX_REFERENCE_SIDE = 4096
LOADER = LoaderDeclaration(
    family=FAMILY,
    folder=FolderInput(
        tooltip="The Qwen-Image-Edit-2509 or -2511 diffusers folder in models/diffusers (every component, with "
                "tokenizer and processor). (none): everything comes from the single files below and the tokenizer "
                "from ComfyUI's bundled copy.",
        what="a Qwen-Image-Edit-2509 or -2511 diffusers folder (every file of the Hugging Face repository "
             "Qwen/Qwen-Image-Edit-2509 or Qwen/Qwen-Image-Edit-2511)",
        pipelines=FAMILY.pipelines,  # never another model's folder
    ),
    files={
        "transformer_file": FileInput(
            "diffusion_models",
            "Transformer from models/diffusion_models: qwen_image_edit_2509_bf16.safetensors, "
            "qwen_image_edit_2509_fp8_e4m3fn.safetensors, qwen_image_edit_2511_bf16.safetensors, "
            "qwen_image_edit_2511_fp8mixed.safetensors or a .gguf (Q8_0, Q6_K, Q4_K, ...). Replaces the folder's "
            "transformer.",
            "a Qwen-Image-Edit-2509 or -2511 transformer: qwen_image_edit_2509_fp8_e4m3fn.safetensors or _bf16, "
            "qwen_image_edit_2511_bf16.safetensors or _fp8mixed (Hugging Face Comfy-Org/Qwen-Image-Edit_ComfyUI) "
            "or a .gguf", "transformer", extensions="TRANSFORMER_EXTENSIONS"),
        "text_encoder_file": FileInput(
            "text_encoders",
            "Qwen2.5-VL-7B from models/text_encoders: qwen_2.5_vl_7b.safetensors or "
            "qwen_2.5_vl_7b_fp8_scaled.safetensors (the vision tower must be in the file).",
            "Qwen2.5-VL-7B: qwen_2.5_vl_7b_fp8_scaled.safetensors (Hugging Face Comfy-Org/Qwen-Image_ComfyUI)",
            "text_encoder"),
        "vae_file": FileInput(
            "vae", "Qwen-Image VAE from models/vae: qwen_image_vae.safetensors.",
            "the Qwen-Image VAE: qwen_image_vae.safetensors (Hugging Face Comfy-Org/Qwen-Image_ComfyUI)", "vae"),
    },
    options={
        "variant": ([AUTO_VARIANT, *VARIANTS], {
            "default": AUTO_VARIANT,
            "tooltip": "Which Qwen-Image edit model the transformer is. auto: 2511 is recognised from the weights "
                       "(the folder's zero_cond_t, the file's __index_timestep_zero__ marker), the rest from the "
                       "folder's model_index.json or the file's name/metadata (2509 and the original have identical "
                       "weights); a GGUF without the marker is told by its name. Qwen-Image-Edit-2511 runs the "
                       "reference pictures at timestep 0. Qwen-Image-Edit (the original) takes one picture with its "
                       "own prompt template.",
        }),
        "weight_dtype": dtype_input(
            "Compute dtype of the transformer and text encoder. auto: ComfyUI's choice for the device (bf16 on "
            "recent GPUs, fp32 on the CPU); Qwen-Image overflows in fp16, so fp16 becomes bf16 (or fp32). GGUF "
            "weights stay quantized whatever this says.", DTYPES),
    },
    optional={"compile": compile_input()},
)
FILES = LOADER.checks




class EditKitQwenImageLoader(declared_loader(LOADER)):
    DISPLAY_NAME = "EditKit · Qwen-Image Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads Qwen-Image-Edit-2509 or -2511 from a diffusers folder in models/diffusers, from ComfyUI's single files "
        "(qwen_image_edit_2509_bf16 / _fp8_e4m3fn, qwen_image_edit_2511_bf16 / _fp8mixed .safetensors or a .gguf in "
        "models/diffusion_models, qwen_2.5_vl_7b(_fp8_scaled).safetensors in models/text_encoders, "
        "qwen_image_vae.safetensors in models/vae), or a mix: a chosen file replaces the folder's component. 2511 is "
        "recognised from the weights (the folder's zero_cond_t, the files' __index_timestep_zero__ marker), else "
        "from the name, and runs with its reference pictures at timestep 0; the 'variant' output says which model "
        "loaded and why. Weights are read only when a node uses an output. GGUF weights stay quantized. The original "
        "Qwen-Image-Edit also works (one picture, its own template)."
    )
    RETURN_TYPES = (MODEL_TYPE, TEXT_TYPE, VAE_TYPE, "STRING")
    RETURN_NAMES = ("model", "text_encoder", "vae", "variant")
    OUTPUT_TOOLTIPS = (
        "The Qwen-Image-Edit transformer, for EditKit · Qwen-Image Edit and Qwen-Image LoRA.",
        "Qwen2.5-VL-7B (reads the instruction together with the pictures), for EditKit · Qwen-Image Edit.",
        "The Qwen-Image VAE, for EditKit · Qwen-Image Edit.",
        "Which model this is and how that was found, e.g. 'Qwen-Image-Edit-2511, from the file's "
        "__index_timestep_zero__ tensor' (only file headers are read for it). Connect it to a text display node "
        "to see it; the same line is in ComfyUI's log.",
    )

    def load(self, diffusers_folder, transformer_file, text_encoder_file, vae_file, variant=AUTO_VARIANT,
             weight_dtype="auto", compile="auto"):
        parts = self.parts(diffusers_folder, transformer_file, vae_file, weight_dtype, compile,
                           variant=variant)
        text = self.text_encoder(parts, text_encoder_file)
        model = QwenImageModel(parts.transformer, parts.scheduler_config, requested_variant=variant,
                               folder=parts.folder, file=parts.file)
        described = model.describe()
        log.info("EditKit · Qwen-Image Loader: %s.", described)
        return (model, text, parts.vae, described)


def _one_picture(image: torch.Tensor, name: str) -> torch.Tensor:
    pixels = image_to_nchw(image)
    if pixels.shape[0] == 0:
        raise EditKitError(
            f"'{name}' got an empty batch (no picture): the node connected to it produced none. Connect a picture "
            f"(e.g. Load Image) to '{name}'" + (", or disconnect it." if name != "image" else ".")
        )
    if pixels.shape[0] != 1:
        raise EditKitError(
            f"'{name}' holds {pixels.shape[0]} pictures, but it takes one. Give the pictures to edit one per run "
            "(e.g. split the batch with ImageFromBatch), and connect extra reference pictures to image2..image5 or "
            "to 'references' (a batch there is several references)."
        )
    return pixels


def _size_input(default: int, tooltip: str) -> tuple:
    return ("INT", {"default": default, "min": 16, "max": 8192, "step": 16, "tooltip": tooltip})


class EditKitQwenImageEdit:
    DISPLAY_NAME = "EditKit · Qwen-Image Edit / Inpaint"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Edits a picture with Qwen-Image-Edit-2509 or -2511 following an instruction: recolour or replace things, add or "
        "remove objects, change text, restyle, or combine several pictures ('put the person in picture 1 in the "
        "jacket from picture 2'). Any number of reference pictures (image2..image5 plus a 'references' batch). "
        "With the 'no shift' reference size the output stays aligned with image 1 pixel for pixel; with a mask only "
        "that area changes and every pixel outside it comes back exactly. The instruction is encoded together with "
        "the pictures once and cached, so changing only seed, steps or CFG does not re-run the 7B encoder."
    )
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = (
        "The edited pictures (batch_size of them). With a mask they have image 1's exact size.",
        "The generated latents in ComfyUI's raw VAE space and Wan-2.1 shape [batch, 16, 1, height/8, width/8]: "
        "native VAEDecode with the Qwen-Image VAE, LatentUpscaleBy and SaveLatent work on them.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From EditKit · Qwen-Image Loader (or a Qwen-Image LoRA node)."}),
                "text_encoder": (TEXT_TYPE, {"tooltip": "Qwen2.5-VL from EditKit · Qwen-Image Loader."}),
                "vae": (VAE_TYPE, {"tooltip": "Qwen-Image VAE from EditKit · Qwen-Image Loader."}),
                "image": ("IMAGE", {"tooltip": "The picture to edit (picture 1 in the prompt). One picture."}),
                "prompt": ("STRING", {
                    "multiline": True, "dynamicPrompts": True, "default": "",
                    "tooltip": "The edit instruction, e.g. 'change the blue tracksuit to red' or 'dress the person in "
                               "picture 1 in the jacket from picture 2'. Put text to write in quotes.",
                }),
                "negative_prompt": ("STRING", {
                    "multiline": True, "default": " ",
                    "tooltip": "What to steer away from when true_cfg_scale is above 1. ' ' (a blank) is Qwen's "
                               "reference; an empty field is treated the same way.",
                }),
                "true_cfg_scale": ("FLOAT", {
                    "default": 4.0, "min": 1.0, "max": 20.0, "step": 0.1,
                    "tooltip": "Qwen's true classifier-free guidance (two transformer passes per step, run as one "
                               "batch). 4 as the reference; 2-7 is useful; 1 turns it off (Lightning LoRAs).",
                }),
                "steps": steps_input(28),
                "seed": seed_input(),
                "denoise": ("FLOAT", {
                    "default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                    "tooltip": "1.0: a full edit from noise. Lower starts from image 1 noised to that level and keeps "
                               "more of it (0.5-0.8 for small changes). Steps stays the number of transformer calls.",
                }),
                "sampler": sampler_input("euler as Qwen's reference; euler_ancestral adds fresh noise each step "
                                         "(seeded from the seed)."),
                "batch_size": batch_input(),
                "output_size": (list(sizes.OUTPUT_MODES), {
                    "default": sizes.MATCH_IMAGE_1,
                    "tooltip": "match image 1: image 1's aspect ratio and size (sides rounded to multiples of 16), "
                               "scaled down to max_megapixels if larger. explicit: width x height.",
                }),
                "width": _size_input(1024, "Output width with output_size 'explicit' (a multiple of 16)."),
                "height": _size_input(1024, "Output height with output_size 'explicit' (a multiple of 16)."),
                "max_megapixels": ("FLOAT", {
                    "default": 1.0, "min": 0.01, "max": 16.0, "step": 0.05,
                    "tooltip": "Largest output, in megapixels (2^20 pixels). Qwen-Image-Edit was trained at about 1.",
                }),
                "reference_size": (list(sizes.REFERENCE_PRESETS), {
                    "default": sizes.NO_SHIFT,
                    "tooltip": "Sizes of the copies of each picture the model reads. no shift: image 1 goes to the "
                               "VAE at the output size, so the result lines up with it pixel for pixel (others as "
                               "the reference). Qwen reference pipeline: exactly diffusers' (384x384-area copy for "
                               "the vision encoder, 1 MP for the VAE; may zoom/shift). custom: the two sizes below "
                               "for every picture.",
                }),
                "custom_vl_size": ("INT", {
                    "default": 384, "min": 56, "max": 2048, "step": 8,
                    "tooltip": "With reference_size 'custom': side of the square whose area each picture's "
                               "vision-language copy gets (384 as the reference; larger reads finer detail).",
                }),
                "custom_vae_size": ("INT", {
                    "default": 1024, "min": 64, "max": MAX_REFERENCE_SIDE, "step": 32,
                    "tooltip": "With reference_size 'custom' (and for pictures 2+ with 'no shift'): side of the "
                               "square whose area each picture's VAE copy gets (1024 as the reference).",
                }),
            },
            "optional": {
                **{f"image{i}": ("IMAGE", {"tooltip": f"Reference picture {i} (picture {i} in the prompt)."})
                   for i in range(2, 6)},
                "references": ("IMAGE", {"tooltip": "More reference pictures as a batch (pictures 6, 7, ... or "
                                                    "following the connected imageN). Any count. Note: ComfyUI's "
                                                    "Batch Images (ImageBatch) crops each added picture to the first "
                                                    "one's aspect ratio (centre) and resizes it to its size; to keep "
                                                    "pictures whole, connect them to image2..image5 instead."}),
                "mask": ("MASK", {"tooltip": "Optional: only this area of image 1 may change (1 = change). The "
                                             "result is blended back with it, so every pixel outside comes back "
                                             "exactly. Best with reference_size 'no shift'."}),
                "latent": ("LATENT", {"tooltip": "Optional: a Qwen-Image latent (native VAE Encode with the Qwen-Image "
                                                 "VAE, LoadLatent, a latent upscale or an earlier edit). Its size "
                                                 "replaces output_size, and with denoise below 1 the edit starts from "
                                                 "it instead of from image 1. Each latent gives batch_size results."}),
            },
        }

    def run(self, model, text_encoder, vae, image, prompt, negative_prompt=" ", true_cfg_scale=4.0, steps=28,
            seed=0, denoise=1.0, sampler="euler", batch_size=1, output_size=sizes.MATCH_IMAGE_1, width=1024,
            height=1024, max_megapixels=1.0, reference_size=sizes.NO_SHIFT, custom_vl_size=384,
            custom_vae_size=1024, image2=None, image3=None, image4=None, image5=None, references=None, mask=None,
            latent=None):
        # Check everything cheap before loading 20+ GB of weights.
        check_prompt(prompt)
        core.SamplerSettings(name=sampler, seed=seed)
        pictures = [_one_picture(image, "image")]
        for index, extra in enumerate((image2, image3, image4, image5), start=2):
            if extra is not None:
                pictures.append(_one_picture(extra, f"image{index}"))
        if references is not None:
            batch = image_to_nchw(references)
            if batch.shape[0] == 0:
                raise EditKitError("'references' got an empty batch (no picture): the node connected to it produced "
                                   "none. Connect one or more reference pictures (Batch Images joins several), or "
                                   "disconnect 'references'.")
            pictures += list(batch.split(1))
        pixel_mask = None
        if mask is not None:
            pixel_mask = mask_to_nchw(mask)
            if pixel_mask.shape[0] != 1:
                raise EditKitError(f"Got {pixel_mask.shape[0]} masks; give one mask for image 1.")
        start = None if latent is None else qwen_latent.from_comfy(latent["samples"])
        output = sizes.OutputSize(output_size, width, height, max_megapixels)
        if start is None:
            output.resolve(pictures[0].shape[-1], pictures[0].shape[-2])
        if reference_size == sizes.REFERENCE:
            references_plan = sizes.ReferenceSizes(sizes.REFERENCE)
        else:
            references_plan = sizes.ReferenceSizes(reference_size, custom_vl_size ** 2, custom_vae_size ** 2)
        variant = model.variant
        transformer = model.transformer.get()
        vae_component = vae.get()
        result = edit(
            transformer, text_encoder.get(), vae_component, pictures, prompt, bridge.runtime(),
            scheduler_config=model.schedule, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
            steps=steps, seed=seed, denoise=denoise, mask=pixel_mask,
            sampler=core.SamplerSettings(name=sampler, seed=seed), batch_size=batch_size, output=output,
            references=references_plan, variant=variant,
            init_latents=None if start is None else vae_ops.latent_format(vae_component).to_model(start),
        )
        raw = vae_ops.latent_format(vae_component).to_raw(result.latents)
        return nchw_to_image(result.images), latent_dict(qwen_latent.to_comfy(raw))


EditKitQwenImageLora = lora_node_class(
    FAMILY.lora, MODEL_TYPE, class_name="EditKitQwenImageLora", display_name="EditKit · Qwen-Image LoRA",
    category=CATEGORY, family_models="Qwen-Image-Edit",
)

NODES = [EditKitQwenImageLoader, EditKitQwenImageEdit, EditKitQwenImageLora]
