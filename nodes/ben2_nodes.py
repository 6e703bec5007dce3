"""ComfyUI nodes for BEN2 background removal (glue only; the work is in ``pipelines.ben2``).

* ``EditKitBEN2Loader`` reads a BEN2 Base checkpoint from ``models/background_removal``.
* ``EditKitBEN2RemoveBackground`` predicts the subject mask for every image of a batch and
  outputs the MASK (1 = subject) and the cut-out IMAGE. For inpainting "everything but the
  subject", switch ``invert`` on and feed the MASK to the inpaint node.
* ``EditKitRefineForeground`` cuts out an image with a mask from any node (e.g. ComfyUI's
  own Remove Background) and removes the background colour left in soft edges.
"""

from __future__ import annotations

import torch

from ..pipelines.ben2 import RemovalSettings, apply_matte, load_ben2, parse_hex_color, remove_background
from ..pipelines.core.errors import EditKitError
from ..pipelines.core.runtime import Component
from . import comfy_bridge
from .common import LoaderFiles, ModelFile, files_signature

CATEGORY = "EditKit/background removal"
MODEL_TYPE = "EDITKIT_BEN2"
MODEL_FOLDER = "background_removal"

PRECISIONS = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESIZE_MODES = ("square (as trained)", "keep aspect ratio")
BACKGROUNDS = ("color", "alpha (RGBA)")

comfy_bridge.register_model_folder(MODEL_FOLDER, comfy_bridge.BEN2_EXTENSIONS)
FILES = LoaderFiles({"model_name": ModelFile(MODEL_FOLDER, "BEN2 Base: model.safetensors from Hugging Face "
                                                           "PramaLLC/BEN2 (any name; or BEN2_Base.pth from there)")})


def _compute_dtype(precision: str) -> torch.dtype:
    """``auto``: fp16 on a CUDA GPU (as the reference runs BEN2; bf16, ComfyUI's usual choice,
    gives no benefit here), fp32 when ComfyUI computes on the CPU or another backend."""
    chosen = PRECISIONS[precision]
    if chosen is not None:
        return chosen
    on_gpu = comfy_bridge.default_dtype("segmentation") != torch.float32 and torch.cuda.is_available()
    return torch.float16 if on_gpu else torch.float32


def _background(mode: str, color: str):
    return None if mode == BACKGROUNDS[1] else parse_hex_color(color)


_BACKGROUND_INPUTS = {
    "background": (
        list(BACKGROUNDS),
        {
            "default": BACKGROUNDS[0],
            "tooltip": "color: the cut-out over a flat colour (a normal 3-channel IMAGE). "
            "alpha (RGBA): a 4-channel IMAGE with the mask as transparency (Save Image writes a transparent PNG; "
            "many other nodes expect 3 channels).",
        },
    ),
    "background_color": (
        "STRING",
        {"default": "#FFFFFF", "tooltip": "Hex colour behind the subject when background is 'color', e.g. #00FF00."},
    ),
}


class EditKitBEN2Loader:
    DISPLAY_NAME = "EditKit · BEN2 Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads BEN2 Base (Background Erase Network 2, MIT licence) from models/background_removal: "
        "model.safetensors or BEN2_Base.pth from the PramaLLC/BEN2 model page. Only weights are read; "
        "no code from the file runs."
    )
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("ben2_model",)
    OUTPUT_TOOLTIPS = ("The BEN2 network, for EditKit · BEN2 Remove Background.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (
                    comfy_bridge.list_models(MODEL_FOLDER, comfy_bridge.BEN2_EXTENSIONS),
                    {"tooltip": "BEN2 Base checkpoint in ComfyUI/models/background_removal (.safetensors or .pth)."},
                ),
                "precision": (
                    list(PRECISIONS),
                    {
                        "default": "auto",
                        "tooltip": "Weight precision. auto: fp16 on an NVIDIA GPU, fp32 on the CPU. "
                        "Use fp32 on a GPU if masks look wrong; fp16/bf16 are meant for GPUs.",
                    },
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, model_name: str, **_):
        try:
            return files_signature([comfy_bridge.model_path(MODEL_FOLDER, model_name)])
        except EditKitError:
            return ""  # the load itself reports the missing file

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return FILES.check(model_name=model_name)

    def load(self, model_name: str, precision: str):
        path = comfy_bridge.model_path(MODEL_FOLDER, model_name)
        dtype = _compute_dtype(precision)
        module = load_ben2(path, dtype=dtype)
        return (Component(module, kind="segmentation", name=f"BEN2 {path.name}", dtype=dtype),)


class EditKitBEN2RemoveBackground:
    DISPLAY_NAME = "EditKit · BEN2 Remove Background"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Finds the main subject of every image in the batch with BEN2. Outputs the MASK (1 = subject; "
        "turn on invert for 1 = background, e.g. to inpaint around the subject) and the cut-out IMAGE "
        "over a colour or as RGBA. Masks are soft (float) unless a threshold is set."
    )
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = (
        "The kept region over the background colour, or RGBA with the mask as alpha.",
        "1 = subject (1 = background when invert is on), at the input size.",
    )
    FUNCTION = "remove"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ben2_model": (MODEL_TYPE, {"tooltip": "From EditKit · BEN2 Loader."}),
                "image": ("IMAGE", {"tooltip": "Images to process; every image of the batch is processed."}),
                "resolution": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 128,
                        "max": 4096,
                        "step": 128,
                        "tooltip": "Size the network works at (multiple of 128). BEN2 was trained at 1024; higher can "
                        "keep finer hair at more memory and time.",
                    },
                ),
                "resize_mode": (
                    list(RESIZE_MODES),
                    {
                        "default": RESIZE_MODES[0],
                        "tooltip": "square: stretch to resolution x resolution, as BEN2 was trained. keep aspect "
                        "ratio: long side at resolution, short side rounded to a multiple of 128 (better for "
                        "very wide or tall images).",
                    },
                ),
                "threshold": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "0 keeps the soft matte. Above 0 the mask becomes hard: 1 where the predicted "
                        "value is at least the threshold, else 0.",
                    },
                ),
                "grow": (
                    "INT",
                    {
                        "default": 0,
                        "min": -512,
                        "max": 512,
                        "step": 1,
                        "tooltip": "Pixels to grow the mask by (negative shrinks it), after the threshold.",
                    },
                ),
                "feather": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 512,
                        "step": 1,
                        "tooltip": "Soften the mask edge over about this many pixels, after grow.",
                    },
                ),
                "invert": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Swap subject and background in both outputs (MASK 1 = background), e.g. to "
                        "inpaint everything but the subject.",
                    },
                ),
                "refine_foreground": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Remove the old background's colour from soft edges (hair, fur) so the cut-out "
                        "has no halo on a new background. Colours are estimated from the network's raw matte; "
                        "threshold / grow / feather only shape the cut. Changes only the IMAGE output.",
                    },
                ),
                **_BACKGROUND_INPUTS,
                "batch_size": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 64,
                        "tooltip": "Images per network pass. Lower it if you run out of memory (about 1.5 GB per "
                        "image at 1024 in fp16).",
                    },
                ),
            }
        }

    def remove(
        self,
        ben2_model: Component,
        image: torch.Tensor,
        resolution: int,
        resize_mode: str,
        threshold: float,
        grow: int,
        feather: int,
        invert: bool,
        refine_foreground: bool,
        background: str,
        background_color: str,
        batch_size: int,
    ):
        settings = RemovalSettings(
            resolution=resolution,
            keep_aspect=resize_mode == RESIZE_MODES[1],
            batch_size=batch_size,
            threshold=threshold,
            grow=grow,
            feather=feather,
            invert=invert,
            refine_foreground=refine_foreground,
            background=_background(background, background_color),
        )
        images, masks = remove_background(ben2_model, image, runtime=comfy_bridge.runtime(), settings=settings)
        return (images, masks)


class EditKitRefineForeground:
    DISPLAY_NAME = "EditKit · Refine Foreground Colour"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Cuts out an image with a mask from any node (e.g. ComfyUI's Remove Background) and removes the old "
        "background's colour from soft edges (blur-fusion foreground estimation), so hair and fur show no halo. "
        "Give it the soft matte as the matting node outputs it, before any threshold, grow or feather: the "
        "estimate assumes the mask is the true opacity of every pixel, so a shaped mask changes the colour of "
        "pixels that are fully subject. To grow or feather the cut-out, use BEN2 Remove Background's own grow / "
        "feather (it estimates colours from the raw matte and cuts out with the shaped mask)."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The cut-out with corrected edge colours, over the background colour or as RGBA.",)
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The original images."}),
                "mask": ("MASK", {"tooltip": "1 = keep (the subject): the soft matte straight from the matting "
                                             "node, not thresholded, grown or feathered. One mask for all images "
                                             "or one per image."}),
                **_BACKGROUND_INPUTS,
            }
        }

    def refine(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        background: str,
        background_color: str,
    ):
        return (apply_matte(image, mask, refine_foreground=True, background=_background(background, background_color)),)


NODES = [EditKitBEN2Loader, EditKitBEN2RemoveBackground, EditKitRefineForeground]
