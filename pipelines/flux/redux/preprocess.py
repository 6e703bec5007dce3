"""Turning pictures into SigLIP's square input: crop modes, then SigLIP's own image processor.

SigLIP so400m-patch14-384 sees a 384x384 square. How a picture of another shape becomes that
square decides what the Redux tokens describe:

* ``center``: the largest centred square (ComfyUI's CLIPVisionEncode default): no distortion,
  the sides of a wide picture are lost;
* ``pad``: the whole picture, its aspect kept, padded to a square with SigLIP's mean grey
  (which normalises to 0, the most neutral value the encoder can see);
* ``autocrop``: a square around the mask's bounding box (mask > 0.5) widened by ``margin``
  (a fraction of the box's longer side), taking real surroundings where the picture has them
  and grey padding only beyond its edges: for "take the style of this object";
* ``none``: the picture squashed to a square, as diffusers' FluxPriorReduxPipeline does
  (SigLIP's image processor resizes without cropping).

Cropping and padding happen on 8-bit pictures (every IMAGE that came from a file is 8-bit);
resizing and normalisation are done by transformers' PIL SigLIP processor (no torchvision), the
same call the reference pipeline makes, so ``none`` equals diffusers exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ...core.errors import EditKitError

CROP_MODES = ("center", "pad", "autocrop", "none")
MASK_THRESHOLD = 0.5


def to_pil(picture: torch.Tensor) -> Image.Image:
    """``[3,H,W]`` float 0..1 → 8-bit RGB PIL image."""
    array = (picture.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _grey(processor) -> tuple[int, int, int]:
    mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(round(float(m) * 255)) for m in mean)


def _place(picture: Image.Image, left: int, top: int, side: int, fill: tuple[int, int, int]) -> Image.Image:
    """The ``side``-square of ``picture`` at (left, top); parts outside the picture are ``fill``."""
    canvas = Image.new("RGB", (side, side), fill)
    crop = picture.crop((max(left, 0), max(top, 0), min(left + side, picture.width), min(top + side, picture.height)))
    canvas.paste(crop, (max(-left, 0), max(-top, 0)))
    return canvas


def mask_box(mask: torch.Tensor, margin: float, index: int) -> tuple[int, int, int]:
    """Square (left, top, side) around the mask's bounding box, grown by ``margin``."""
    rows = torch.nonzero((mask > MASK_THRESHOLD).any(dim=1)).flatten()
    cols = torch.nonzero((mask > MASK_THRESHOLD).any(dim=0)).flatten()
    if rows.numel() == 0:
        raise EditKitError(
            f"crop 'autocrop' needs a mask that marks the part of picture {index + 1} to use, but its mask is empty "
            f"(no value above {MASK_THRESHOLD}). Paint the mask, or choose crop 'center' or 'pad'."
        )
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    side = max(bottom - top, right - left)
    side = int(round(side * (1 + 2 * margin)))
    height, width = mask.shape
    cy, cx = (top + bottom) / 2, (left + right) / 2
    # Keep the square inside the picture where it fits, so it shows real surroundings, not padding.
    y0 = int(round(cy - side / 2))
    x0 = int(round(cx - side / 2))
    y0 = min(max(y0, 0), height - side) if side <= height else (height - side) // 2
    x0 = min(max(x0, 0), width - side) if side <= width else (width - side) // 2
    return x0, y0, side


def square_pictures(images: torch.Tensor, crop: str, processor, mask: torch.Tensor | None = None,
                    margin: float = 0.1) -> list[Image.Image]:
    """``[B,3,H,W]`` pictures → one PIL picture per image, square unless ``crop`` is ``none``."""
    if crop not in CROP_MODES:
        raise EditKitError(f"Unknown crop mode '{crop}'. Use one of: {', '.join(CROP_MODES)}.")
    batch, _, height, width = images.shape
    if crop == "autocrop":
        if mask is None:
            raise EditKitError("crop 'autocrop' needs a mask (1 = the part of the picture to use). Connect one, "
                               "or choose crop 'center' or 'pad'.")
        if mask.shape[-2:] != (height, width):
            raise EditKitError(f"The mask is {mask.shape[-1]}x{mask.shape[-2]} but the pictures are "
                               f"{width}x{height}. Give a mask of the pictures' size.")
        if mask.shape[0] not in (1, batch):
            raise EditKitError(f"{mask.shape[0]} masks for {batch} pictures. Give one mask, or one per picture.")
    fill = _grey(processor)
    out = []
    for i in range(batch):
        picture = to_pil(images[i])
        if crop == "center":
            side = min(height, width)
            picture = picture.crop(((width - side) // 2, (height - side) // 2,
                                    (width - side) // 2 + side, (height - side) // 2 + side))
        elif crop == "pad":
            side = max(height, width)
            picture = _place(picture, -((side - width) // 2), -((side - height) // 2), side, fill)
        elif crop == "autocrop":
            m = mask[i if mask.shape[0] > 1 else 0]
            left, top, side = mask_box(m, margin, i)
            picture = _place(picture, left, top, side, fill)
        out.append(picture)
    return out


def pixel_values(pictures: list[Image.Image], processor) -> torch.Tensor:
    """SigLIP's input ``[B,3,S,S]``: the processor call diffusers' FluxPriorReduxPipeline makes."""
    return processor.preprocess(images=pictures, do_resize=True, return_tensors="pt",
                                do_convert_rgb=True)["pixel_values"]


def seen_pictures(values: torch.Tensor, processor) -> torch.Tensor:
    """What SigLIP sees, back as an IMAGE ``[B,S,S,3]`` in 0..1 (for checking the crop)."""
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (values.float() * std + mean).clamp(0, 1).movedim(1, -1)
