"""FLUX.1 Redux nodes: the prior's loader and encoder, and a base64 picture loader (thin glue over pipelines/)."""

from __future__ import annotations

from ..pipelines.core.base64_image import DEFAULT_MAX_PIXELS, load_base64_image
from ..pipelines.core.errors import EditKitError
from ..pipelines.core.images import image_to_nchw
from ..pipelines.flux.conditioning import make_conditioning
from ..pipelines.flux.redux import prior as redux_prior
from ..pipelines.flux.redux.loading import ReduxModel
from ..pipelines.flux.redux.preprocess import CROP_MODES
from . import comfy_bridge as bridge
from .common import (
    NONE,
    chosen_file,
)
from .family_loader import WEIGHT_DTYPES, FileInput, FolderInput, LoaderDeclaration, declared_loader, dtype_input

CATEGORY = "EditKit/flux redux"
DTYPES = WEIGHT_DTYPES
LOADER = LoaderDeclaration(
    folder=FolderInput(
        tooltip="The FLUX.1-Redux-dev diffusers folder in models/diffusers. Choose (none) to use the two single "
                "files below.",
        what="a FLUX.1-Redux-dev diffusers folder (every file of the Hugging Face repository "
             "black-forest-labs/FLUX.1-Redux-dev)",
        name_hint="redux",
    ),
    files={
        "style_model_file": FileInput(
            "style_models",
            "Optional Redux embedder file from models/style_models (flux1-redux-dev.safetensors). Replaces the "
            "folder's image_embedder.",
            "the Redux embedder: flux1-redux-dev.safetensors (Hugging Face Comfy-Org/Flux1-Redux-Dev)",
            "image_embedder"),
        "clip_vision_file": FileInput(
            "clip_vision",
            "Optional SigLIP file from models/clip_vision (sigclip_vision_patch14_384.safetensors). Replaces the "
            "folder's image_encoder.",
            "SigLIP: sigclip_vision_patch14_384.safetensors (Hugging Face Comfy-Org/sigclip_vision_384)",
            "image_encoder"),
    },
    options={"weight_dtype": dtype_input(
        "Compute dtype of SigLIP and the embedder. auto: ComfyUI's choice for text/vision encoders (bf16 or fp16 on "
        "a GPU, fp32 on the CPU).")},
)
FILES = LOADER.checks



class EditKitReduxLoader(declared_loader(LOADER)):
    DISPLAY_NAME = "EditKit · Redux Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads the FLUX.1 Redux prior (SigLIP image encoder + Redux embedder): the diffusers folder "
        "models/diffusers/FLUX.1-Redux-dev, or ComfyUI's single files flux1-redux-dev.safetensors (models/style_models) "
        "and sigclip_vision_patch14_384.safetensors (models/clip_vision); a chosen file replaces the folder's part. "
        "Nothing is read until EditKit · Redux Encode runs. No text encoder is needed."
    )
    RETURN_TYPES = ("EDITKIT_REDUX",)
    RETURN_NAMES = ("redux",)
    OUTPUT_TOOLTIPS = ("The Redux prior, for EditKit · Redux Encode.",)

    def load(self, diffusers_folder, style_model_file, clip_vision_file, weight_dtype="auto"):
        folder = None if diffusers_folder == NONE else bridge.model_path("diffusers", diffusers_folder)
        dtype = DTYPES[weight_dtype] or bridge.default_dtype("text_encoder")
        return (ReduxModel(folder, chosen_file(clip_vision_file, "clip_vision"),
                           chosen_file(style_model_file, "style_models"), dtype),)


class EditKitReduxEncode:
    DISPLAY_NAME = "EditKit · Redux Encode (variations)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Turns pictures into a FLUX.1 conditioning with the Redux prior, so FLUX.1-dev makes variations of them "
        "with no text encoder loaded. Several pictures (an image batch) are summed with per-picture weights (as "
        "diffusers' FluxPriorReduxPipeline) or concatenated (as chained StyleModelApply). downsampling_factor "
        "above 1 uses fewer picture tokens so a prompt (optional conditioning input) gets more say. The output is "
        "ComfyUI's native Flux CONDITIONING: it feeds EditKit · Flux Sampler and native KSampler alike."
    )
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "IMAGE")
    RETURN_NAMES = ("conditioning", "siglip_input")
    OUTPUT_TOOLTIPS = (
        "FLUX.1 conditioning: the prompt (or a zero prompt) followed by the picture tokens.",
        "What SigLIP saw (each picture after cropping and resizing), to check the crop.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "redux": ("EDITKIT_REDUX", {"tooltip": "From EditKit · Redux Loader."}),
                "image": ("IMAGE", {"tooltip": "The picture(s). A batch of several pictures blends them."}),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                    "tooltip": "Multiplies the picture tokens (diffusers' prompt_embeds_scale). Below 1 the picture "
                               "dominates less; the prompt, if any, is kept as it is.",
                }),
                "downsampling_factor": ("FLOAT", {
                    "default": 1.0, "min": 1.0, "max": 9.0, "step": 0.5,
                    "tooltip": "1 keeps all 729 picture tokens (27x27). f keeps ceil(27/f)² tokens (3 → 81): "
                               "weaker picture influence, more room for a prompt.",
                }),
                "downsampling_mode": (list(redux_prior.DOWNSAMPLING_MODES), {
                    "default": "area",
                    "tooltip": "How the token grid is shrunk when downsampling_factor > 1. area averages (smooth); "
                               "bicubic/bilinear interpolate; nearest picks tokens.",
                }),
                "crop": (list(CROP_MODES), {
                    "default": "center",
                    "tooltip": "How a picture becomes SigLIP's square: center = the centred square (as ComfyUI's "
                               "CLIPVisionEncode); pad = the whole picture padded with grey; autocrop = a square "
                               "around the mask (needs mask); none = squashed to a square (as diffusers).",
                }),
                "combine": (list(redux_prior.COMBINE_MODES), {
                    "default": "sum",
                    "tooltip": "Several pictures: sum = one weighted sum of their tokens (diffusers); concat = all "
                               "their tokens one after another (ComfyUI's chained StyleModelApply; more tokens).",
                }),
            },
            "optional": {
                "model": ("EDITKIT_FLUX", {
                    "tooltip": "The FLUX.1 model from EditKit · Flux Loader. Needed when no conditioning is "
                               "connected: the zero prompt's T5 and pooled widths are read from its config.",
                }),
                "conditioning": ("CONDITIONING", {
                    "tooltip": "Optional FLUX.1 prompt to append the picture tokens to (EditKit · Flux Text Encode "
                               "or native CLIPTextEncode with DualCLIPLoader type flux). Unconnected: a zero "
                               "prompt, so no text encoder is needed.",
                }),
                "weights": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": "Per-picture weights, comma-separated (e.g. '0.7, 0.3'); one per picture of the "
                               "batch, each 0 or more. Empty = all 1.",
                }),
                "mask": ("MASK", {
                    "tooltip": "For crop autocrop: 1 = the part of the picture to use (one mask, or one per "
                               "picture). Ignored by the other crop modes.",
                }),
                "autocrop_margin": ("FLOAT", {
                    "default": 0.1, "min": 0.0, "max": 2.0, "step": 0.05,
                    "tooltip": "autocrop: context added around the mask's box, as a fraction of its longer side.",
                }),
            },
        }

    def encode(self, redux, image, strength, downsampling_factor, downsampling_mode, crop, combine, model=None,
               conditioning=None, weights="", mask=None, autocrop_margin=0.1):
        pictures = image_to_nchw(image)
        settings = redux_prior.ReduxSettings(
            strength=strength, weights=redux_prior.parse_weights(weights, pictures.shape[0]),
            downsampling_factor=downsampling_factor, downsampling_mode=downsampling_mode, combine=combine,
            crop=crop, autocrop_margin=autocrop_margin,
        )
        redux_prior.check_settings(settings)
        if conditioning is None and model is None:
            raise EditKitError(
                "EditKit · Redux Encode needs either a conditioning to append to, or the FLUX.1 model (connect "
                "EditKit · Flux Loader's model output) to read the zero prompt's widths from."
            )
        config = model.transformer.get().module.config if model is not None else None
        prior = redux.prior.get()
        if config is not None and prior.token_width != config.joint_attention_dim:
            raise EditKitError(
                f"The Redux embedder makes {prior.token_width}-wide tokens but this FLUX.1 transformer reads "
                f"{config.joint_attention_dim}-wide text. Use FLUX.1-Redux-dev with a FLUX.1 (dev/schnell) model."
            )
        masks = None if mask is None else (mask[None] if mask.ndim == 2 else mask).float()
        out = redux_prior.encode(prior, pictures, settings, bridge.runtime(), masks)
        if conditioning is None:
            states, pooled = redux_prior.zero_text(config.joint_attention_dim, config.pooled_projection_dim)
            conditioning = make_conditioning(states, pooled)
        pooled_width = None if config is None else config.pooled_projection_dim
        return redux_prior.append_to_conditioning(conditioning, out.tokens, pooled_width), out.seen


class EditKitLoadImageBase64:
    DISPLAY_NAME = "EditKit · Load Image (base64)"
    CATEGORY = "EditKit/image"
    DESCRIPTION = (
        "Decodes a picture sent as base64 text (or a data: URL) inside the API prompt, so one POST /prompt carries "
        "the whole request with no separate upload. PNG, JPEG or WebP. Like Load Image: the MASK is 1 - alpha "
        "(transparent = to change); a picture without alpha gets an empty mask of its size."
    )
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The picture (RGB).", "1 - alpha (all zero without transparency).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "data": ("STRING", {
                    "default": "", "multiline": False,  # a one-line widget: kilobytes of base64 need no text box
                    "tooltip": "The picture file's bytes, base64-encoded (PNG, JPEG or WebP); a data:image/...;base64, "
                               "prefix and line breaks are fine.",
                }),
                "max_pixels": ("INT", {
                    "default": DEFAULT_MAX_PIXELS, "min": 1, "max": 256 * 1024 * 1024,
                    "tooltip": "Largest picture accepted (width x height), checked before decoding. Default 4096².",
                }),
            }
        }

    def load(self, data, max_pixels=DEFAULT_MAX_PIXELS):
        return load_base64_image(data, max_pixels)


NODES = [EditKitReduxLoader, EditKitReduxEncode, EditKitLoadImageBase64]
