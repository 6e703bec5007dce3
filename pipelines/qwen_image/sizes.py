"""Output and reference sizes of a Qwen-Image edit, and the picture resizing they need.

Why this module exists: where the copies of each picture go, and at which size, decides whether
the edit "shifts". diffusers' ``QwenImageEditPlusPipeline`` (and ComfyUI's
TextEncodeQwenImageEditPlus) resize every picture to ~384² for the vision-language encoder and
to ~1 MP for the VAE, whatever the output size; when the output is not exactly that 1 MP size,
the reference latent and the output grid disagree and the result is zoomed or shifted against
the input (ComfyUI #9481, Qwen-Image #229, diffusers #12453). The presets:

* ``"Qwen reference pipeline"`` — exactly diffusers' sizes (``CONDITION_IMAGE_SIZE`` and
  ``VAE_IMAGE_SIZE`` areas, sides rounded to 32 by ``calculate_dimensions``), for parity;
* ``"no shift"`` — picture 1 goes to the VAE *at the output size*, so its reference tokens sit on
  the output's grid and unedited regions line up pixel for pixel; other pictures as the reference;
* ``"custom"`` — the reference's rule with the areas the user sets.

Resizing uses PIL's Lanczos filter on 8-bit pictures, as diffusers' ``VaeImageProcessor`` does (and
ComfyUI's own Lanczos upscale), so the reference preset reproduces diffusers' inputs exactly; a
picture already at the wanted size is used as it is, without any round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import EditKitError
from .latent import MULTIPLE

REFERENCE = "Qwen reference pipeline"
NO_SHIFT = "no shift"
CUSTOM = "custom"
REFERENCE_PRESETS = (NO_SHIFT, REFERENCE, CUSTOM)
MATCH_IMAGE_1 = "match image 1"
EXPLICIT = "explicit"
OUTPUT_MODES = (MATCH_IMAGE_1, EXPLICIT)
VL_AREA = 384 * 384  # diffusers' CONDITION_IMAGE_SIZE
VAE_AREA = 1024 * 1024  # diffusers' VAE_IMAGE_SIZE


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """``(width, height)`` of about ``target_area`` pixels with aspect ``ratio``, sides multiples of 32.

    diffusers' own rule from the Qwen edit pipelines (imported there, so parity holds by construction).
    """
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as reference

    width, height = reference(target_area, ratio)
    return int(width), int(height)


@dataclass(frozen=True)
class OutputSize:
    mode: str = MATCH_IMAGE_1
    width: int = 1024
    height: int = 1024
    max_megapixels: float = 1.0

    def resolve(self, image_w: int, image_h: int) -> tuple[int, int]:
        """The output ``(width, height)`` for an image 1 of ``image_w x image_h``."""
        cap = float(self.max_megapixels) * 1024 * 1024
        if self.mode == EXPLICIT:
            w, h = int(self.width), int(self.height)
            if w % MULTIPLE or h % MULTIPLE or w < MULTIPLE or h < MULTIPLE:
                raise EditKitError(
                    f"Output size {w}x{h}: Qwen-Image needs width and height that are multiples of {MULTIPLE}, e.g. "
                    f"{max(MULTIPLE, w // MULTIPLE * MULTIPLE)}x{max(MULTIPLE, h // MULTIPLE * MULTIPLE)}."
                )
            if w * h > cap:
                raise EditKitError(
                    f"Output size {w}x{h} is {w * h / 2**20:.2f} megapixels, more than max_megapixels "
                    f"({self.max_megapixels}). Lower width/height or raise max_megapixels."
                )
            return w, h
        if self.mode != MATCH_IMAGE_1:
            raise EditKitError(f"Unknown output_size '{self.mode}'. Use one of: {', '.join(OUTPUT_MODES)}.")
        w, h = float(image_w), float(image_h)
        if w * h > cap:  # scale down to the cap, then round down so the cap holds
            scale = math.sqrt(cap / (w * h))
            return (max(MULTIPLE, int(w * scale) // MULTIPLE * MULTIPLE),
                    max(MULTIPLE, int(h * scale) // MULTIPLE * MULTIPLE))
        return (max(MULTIPLE, int(w / MULTIPLE + 0.5) * MULTIPLE),
                max(MULTIPLE, int(h / MULTIPLE + 0.5) * MULTIPLE))


@dataclass(frozen=True)
class ReferenceSizes:
    """Which size each picture's vision-language (VL) and VAE copies get."""

    preset: str = NO_SHIFT
    vl_area: int = VL_AREA
    vae_area: int = VAE_AREA

    def plan(self, sizes: list[tuple[int, int]], output: tuple[int, int], same_vl_as_vae: bool = False):
        """Per picture ``((vl_w, vl_h), (vae_w, vae_h))`` for pictures of ``sizes`` (w, h).

        ``same_vl_as_vae``: the original Qwen-Image-Edit reads its one picture at the VAE size.
        """
        if self.preset not in REFERENCE_PRESETS:
            raise EditKitError(f"Unknown reference_size '{self.preset}'. Use one of: {', '.join(REFERENCE_PRESETS)}.")
        plan = []
        for index, (w, h) in enumerate(sizes):
            ratio = w / h
            vae = calculate_dimensions(self.vae_area, ratio)
            if index == 0 and self.preset == NO_SHIFT:
                vae = output
            vl = vae if same_vl_as_vae else calculate_dimensions(self.vl_area, ratio)
            plan.append((vl, vae))
        return plan


# --------------------------------------------------------------------------------------
# Resizing


def to_pil(picture: torch.Tensor) -> Image.Image:
    """``[3,H,W]`` in 0..1 → 8-bit RGB (rounded, so 8-bit inputs come back exactly)."""
    array = (picture.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")


def from_pil(picture: Image.Image) -> torch.Tensor:
    """8-bit RGB → ``[1,3,H,W]`` float32 in 0..1 (``/ 255`` in float32, as diffusers' ``pil_to_numpy``)."""
    array = np.asarray(picture.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def lanczos(picture: Image.Image, width: int, height: int) -> Image.Image:
    return picture.resize((width, height), resample=Image.Resampling.LANCZOS)


def vae_copy(picture: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[1,3,H,W]`` picture for the VAE at ``width x height``; the picture itself when it already has that size."""
    if tuple(picture.shape[-2:]) == (height, width):
        return picture.float()
    return from_pil(lanczos(to_pil(picture[0]), width, height))


def vl_copy(picture: torch.Tensor, width: int, height: int) -> Image.Image:
    """The vision-language copy (PIL; the Qwen2-VL processor resizes it once more to multiples of 28)."""
    return lanczos(to_pil(picture[0]), width, height)


def resize_result(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Generated ``[B,3,h,w]`` pixels back to the input's size (antialiased bicubic, no 8-bit rounding)."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    return F.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
