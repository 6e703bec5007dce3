"""Qwen-Image-Layered nodes: loader and decomposition (thin glue over pipelines/qwen_image/layered*)."""

from __future__ import annotations

import logging

import torch

from ..pipelines.core.errors import EditKitError
from ..pipelines.core.images import LOAD_IMAGE_EMPTY_MASK_SIZE, mask_to_nchw
from ..pipelines.qwen_image import layered_loading as loading
from ..pipelines.qwen_image.family import LAYERED
from ..pipelines.qwen_image.layered import MAX_LAYERS, MIN_RESOLUTION, RESOLUTIONS, decompose
from ..pipelines.qwen_image.layered_text import CAPTION_LANGUAGES
from . import comfy_bridge as bridge
from .common import (
    chosen_file,
    compile_input,
    seed_input,
    steps_input,
)
from .family_loader import FileInput, FolderInput, LoaderDeclaration, declared_loader, dtype_input
from .qwen_image_nodes import DTYPES, TEXT_TYPE

log = logging.getLogger("EditKit")

CATEGORY = "EditKit/qwen-image"
MODEL_TYPE = "EDITKIT_QWEN_IMAGE_LAYERED"
VAE_TYPE = "EDITKIT_QWEN_IMAGE_LAYERED_VAE"
LOADER = LoaderDeclaration(
    family=LAYERED,
    folder=FolderInput(
        tooltip="The Qwen-Image-Layered diffusers folder in models/diffusers (every component, with tokenizer and "
                "processor). (none): everything comes from the single files below and the tokenizer from ComfyUI's "
                "bundled copy.",
        what="a Qwen-Image-Layered diffusers folder (every file of the Hugging Face repository "
             "Qwen/Qwen-Image-Layered)",
        name_hint="layered",
    ),
    files={
        "transformer_file": FileInput(
            "diffusion_models",
            "Transformer from models/diffusion_models: qwen_image_layered_bf16.safetensors, "
            "qwen_image_layered_fp8mixed.safetensors or a .gguf. Replaces the folder's.",
            "a Qwen-Image-Layered transformer: qwen_image_layered_bf16.safetensors or _fp8mixed (Hugging Face "
            "Comfy-Org/Qwen-Image-Layered_ComfyUI) or a .gguf", "transformer", extensions="TRANSFORMER_EXTENSIONS"),
        "text_encoder_file": FileInput(
            "text_encoders",
            "Qwen2.5-VL-7B from models/text_encoders (qwen_2.5_vl_7b.safetensors or "
            "qwen_2.5_vl_7b_fp8_scaled.safetensors). Captioning an empty prompt needs a file that keeps the "
            "language-model head (lm_head); the folder's text encoder has it.",
            "Qwen2.5-VL-7B: qwen_2.5_vl_7b_fp8_scaled.safetensors (Hugging Face Comfy-Org/Qwen-Image_ComfyUI)",
            "text_encoder"),
        "vae_file": FileInput(
            "vae",
            "The RGBA VAE from models/vae: qwen_image_layered_vae.safetensors (not Qwen-Image's "
            "qwen_image_vae.safetensors, which has no alpha channel).",
            "the RGBA VAE: qwen_image_layered_vae.safetensors (Hugging Face Comfy-Org/Qwen-Image-Layered_ComfyUI)",
            "vae"),
    },
    options={"weight_dtype": dtype_input(
        "Compute dtype of the transformer and text encoder. auto: ComfyUI's choice for the device (bf16 on recent "
        "GPUs, fp32 on the CPU); fp16 becomes bf16 (Qwen-Image overflows in fp16). GGUF weights stay quantized "
        "whatever this says.", DTYPES)},
    optional={"compile": compile_input()},
)
FILES = LOADER.checks




class EditKitQwenImageLayeredLoader(declared_loader(LOADER)):
    DISPLAY_NAME = "EditKit · Qwen-Image-Layered Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads Qwen-Image-Layered (picture → transparent layers) from the diffusers folder "
        "models/diffusers/Qwen-Image-Layered or from ComfyUI's single files (qwen_image_layered_bf16 / _fp8mixed "
        ".safetensors or a .gguf in models/diffusion_models, qwen_image_layered_vae.safetensors in models/vae, "
        "qwen_2.5_vl_7b*.safetensors in models/text_encoders), or a mix: a chosen file replaces the folder's "
        "component. Nothing is read until a node uses an output. The text encoder is shared with the Qwen-Image "
        "Edit nodes when both load the same file."
    )
    RETURN_TYPES = (MODEL_TYPE, TEXT_TYPE, VAE_TYPE)
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = (
        "The Qwen-Image-Layered transformer, for EditKit · Qwen-Image-Layered Decompose.",
        "Qwen2.5-VL-7B with its language-model head (it captions the picture when the prompt is empty).",
        "The RGBA VAE of Qwen-Image-Layered (transparent layers).",
    )

    def load(self, diffusers_folder, transformer_file, text_encoder_file, vae_file, weight_dtype="auto", compile="auto"):
        parts = self.parts(diffusers_folder, transformer_file, vae_file, weight_dtype, compile)
        encoder = self.text_encoder(parts, text_encoder_file)
        head = loading.caption_head_source(parts.folder, chosen_file(text_encoder_file, "text_encoders"))
        text = loading.CaptioningTextEncoder(encoder, head)
        return (loading.LayeredModel(parts.transformer, parts.scheduler_config), text, parts.vae)


def _rgba_pictures(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """IMAGE ``[B,H,W,3|4]`` (+ Load Image's MASK, 1 = transparent) → ``[B,4,H,W]`` RGBA in 0..1."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise EditKitError(f"Expected an IMAGE [batch, height, width, 3 or 4]; got shape {tuple(image.shape)}.")
    if image.shape[0] == 0:
        raise EditKitError("The IMAGE batch holds no picture. Connect a Load Image (or any IMAGE with a picture).")
    pixels = image.movedim(-1, 1).float()
    b, _, h, w = pixels.shape
    alpha = pixels[:, 3:] if pixels.shape[1] == 4 else torch.ones(b, 1, h, w)
    if mask is not None:
        transparent = mask_to_nchw(mask)
        size = LOAD_IMAGE_EMPTY_MASK_SIZE
        placeholder = tuple(transparent.shape[-2:]) == (size, size) and (h, w) != (size, size) and not transparent.any()
        if not placeholder:  # Load Image's placeholder means "no transparency"
            if tuple(transparent.shape[-2:]) != (h, w):
                raise EditKitError(
                    f"The mask is {transparent.shape[-1]}x{transparent.shape[-2]} but the picture is {w}x{h}. Connect "
                    "the MASK of the same Load Image node (its transparent pixels), or leave 'mask' unconnected."
                )
            if transparent.shape[0] not in (1, b):
                raise EditKitError(f"Got {transparent.shape[0]} masks for {b} pictures: give one, or one per picture.")
            alpha = (1.0 - transparent).expand(b, -1, -1, -1)
    return torch.cat([pixels[:, :3], alpha], dim=1).clamp(0, 1)


class EditKitQwenImageLayered:
    DISPLAY_NAME = "EditKit · Qwen-Image-Layered Decompose"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Splits a picture into transparent RGBA layers with Qwen-Image-Layered (background, objects, text... each on "
        "its own layer; stacked in order they give the picture back). Outputs the layers of every picture as one "
        "RGBA IMAGE batch (layers of picture 1 first) and their alpha as a MASK batch (1 = the layer covers the "
        "pixel), ready for SaveImage (transparent PNGs) or as edit masks. With an empty prompt the model first "
        "describes the picture itself (as Qwen's pipeline does; the caption is written to the log)."
    )
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("layers", "alpha")
    OUTPUT_TOOLTIPS = (
        "The RGBA layers: 'layers' per input picture, picture 1's first, at the resolution bucket's size.",
        "Each layer's alpha (1 = covered by the layer), in the same order.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From EditKit · Qwen-Image-Layered Loader."}),
                "text_encoder": (TEXT_TYPE, {"tooltip": "Qwen2.5-VL from EditKit · Qwen-Image-Layered Loader (the "
                                                        "Qwen-Image Loader's works too when a prompt is written)."}),
                "vae": (VAE_TYPE, {"tooltip": "The RGBA VAE from EditKit · Qwen-Image-Layered Loader."}),
                "image": ("IMAGE", {"tooltip": "The picture(s) to decompose. Each picture of a batch is decomposed "
                                               "on its own (seed, seed + 1, ...)."}),
                "layers": ("INT", {"default": 4, "min": 1, "max": MAX_LAYERS,
                                   "tooltip": "How many transparent layers to split each picture into (4 as Qwen's "
                                              "reference; 3-8 are typical)."}),
                "prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "A description of the whole picture. Empty: the model describes the picture itself "
                               "first (as the reference pipeline), which costs up to 512 generated tokens.",
                }),
                "steps": steps_input(50),
                "true_cfg_scale": ("FLOAT", {
                    "default": 4.0, "min": 1.0, "max": 20.0, "step": 0.1,
                    "tooltip": "Qwen's true classifier-free guidance against the negative prompt (two transformer "
                               "passes per step, run as one batch). 4 as the reference; 1 turns it off.",
                }),
                "resolution": ("INT", {
                    "default": RESOLUTIONS[0], "min": MIN_RESOLUTION, "max": 2048, "step": 32,
                    "tooltip": "Resolution bucket: the layers get about resolution² pixels at the picture's aspect "
                               "ratio (sides multiples of 32). The model was trained at 640 (recommended) and 1024.",
                }),
                "seed": seed_input(),
            },
            "optional": {
                "negative_prompt": ("STRING", {
                    "multiline": True, "default": " ",
                    "tooltip": "What true CFG steers away from. ' ' (a blank) is Qwen's reference; empty counts as ' '.",
                }),
                "cfg_normalize": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Rescale the guided prediction to the norm of the conditional one (Qwen's reference "
                               "setting for this model; off = plain CFG).",
                }),
                "caption_language": (list(CAPTION_LANGUAGES), {
                    "default": "en",
                    "tooltip": "Language of the model's own caption when the prompt is empty (en as Qwen's example; "
                               "zh: Chinese instructions and caption).",
                }),
                "mask": ("MASK", {"tooltip": "Optional: Load Image's MASK, so transparent pixels of a PNG stay "
                                             "transparent (1 = transparent). An IMAGE with 4 channels brings its own "
                                             "alpha."}),
            },
        }

    def run(self, model, text_encoder, vae, image, layers=4, prompt="", steps=50, true_cfg_scale=4.0,
            resolution=RESOLUTIONS[0], seed=0, negative_prompt=" ", cfg_normalize=True, caption_language="en",
            mask=None):
        # Everything cheap is checked before 20+ GB of weights load.
        if int(layers) < 1:
            raise EditKitError(f"layers must be at least 1 (got {layers}).")
        if caption_language not in CAPTION_LANGUAGES:
            raise EditKitError(f"Unknown caption_language '{caption_language}'. Use one of: "
                               f"{', '.join(CAPTION_LANGUAGES)}.")
        pictures = _rgba_pictures(image, mask)
        head = None
        if not prompt.strip() and hasattr(text_encoder, "caption_head"):
            head = text_encoder.caption_head()
        transformer, vae_component = model.transformer.get(), vae.get()
        outputs = []
        for index in range(pictures.shape[0]):
            result = decompose(
                transformer, text_encoder, vae_component, pictures[index:index + 1], bridge.runtime(),
                scheduler_config=model.scheduler_config, layers=layers, prompt=prompt,
                negative_prompt=negative_prompt, caption_head=head, caption_language=caption_language,
                true_cfg_scale=true_cfg_scale, cfg_normalize=cfg_normalize, steps=steps, seed=int(seed) + index,
                resolution=resolution,
            )
            outputs.append(result.layers)
            if result.caption != prompt:
                log.info("EditKit: Qwen-Image-Layered caption of picture %d: %s", index + 1, result.caption)
        layered = torch.cat(outputs).clamp(0, 1).movedim(1, -1).float()
        return layered, layered[..., 3].clone()


NODES = [EditKitQwenImageLayeredLoader, EditKitQwenImageLayered]
