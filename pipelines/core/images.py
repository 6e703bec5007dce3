"""ComfyUI IMAGE / MASK tensors: validation and layout changes.

ComfyUI's conventions (research/comfyui.md §6c): IMAGE is ``[B,H,W,C]`` float in 0..1 (C=3,
sometimes 4), MASK is ``[B,H,W]`` (sometimes ``[H,W]``) float in 0..1 with 1 = the region to
change. Models want ``[B,C,H,W]``. Everything here is batched; nothing loops over images.
"""

from __future__ import annotations

import torch

from .errors import EditKitError


def image_to_nchw(image: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B,H,W,C]`` → ``[B,3,H,W]`` float32 (alpha, if any, is dropped)."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise EditKitError(
            f"Expected an IMAGE tensor [batch, height, width, 3]; got shape {tuple(image.shape)}. "
            "Connect an IMAGE output (e.g. from Load Image)."
        )
    image = image[..., :3] if image.shape[-1] >= 3 else image.expand(*image.shape[:-1], 3)
    return image.movedim(-1, 1).float()


def nchw_to_image(images: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W]`` → IMAGE ``[B,H,W,3]`` float32 clamped to 0..1."""
    return images.clamp(0, 1).movedim(1, -1).float()


def mask_to_nchw(mask: torch.Tensor) -> torch.Tensor:
    """MASK ``[B,H,W]`` or ``[H,W]`` → ``[B,1,H,W]`` float32 clamped to 0..1."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise EditKitError(
            f"Expected a MASK tensor [batch, height, width]; got shape {tuple(mask.shape)}. Connect a MASK output."
        )
    return mask.unsqueeze(1).float().clamp(0, 1)


def check_multiple_of(height: int, width: int, multiple: int, what: str = "Image") -> None:
    """Raise a clear error unless both sides are multiples of ``multiple``."""
    if height % multiple or width % multiple:
        down_w, down_h = width // multiple * multiple, height // multiple * multiple
        raise EditKitError(
            f"{what} is {width}x{height}, but FLUX.1 needs width and height that are multiples of {multiple}. "
            f"Resize or crop it first, e.g. to {max(down_w, multiple)}x{max(down_h, multiple)} "
            "(ImageScale or ImageCrop)."
        )


# ComfyUI's Load Image outputs an all-zero 64x64 MASK when the picture has no transparency and
# nothing was painted in the mask editor.
LOAD_IMAGE_EMPTY_MASK_SIZE = 64


def check_not_load_image_empty_mask(mask: torch.Tensor, height: int, width: int) -> None:
    """Raise a clear error for Load Image's placeholder mask given with a picture of another size.

    Without this the user reads "Mask is 64x64 but the image is 768x768", which points at sizes
    when the real problem is that no mask was painted.
    """
    size = LOAD_IMAGE_EMPTY_MASK_SIZE
    if tuple(mask.shape[-2:]) == (size, size) and (height, width) != (size, size) and not bool(mask.any()):
        raise EditKitError(
            f"The mask is empty: Load Image gives an empty {size}x{size} mask when nothing was painted and the "
            "picture has no transparency. Paint a mask or load a picture with transparency (transparent pixels "
            "are the area to change); to paint, right-click the Load Image node and choose Open in MaskEditor."
        )


def match_mask_to_images(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Check a ``[Bm,1,H,W]`` mask against ``[B,3,H,W]`` images and broadcast its batch.

    A single mask applies to every image; otherwise the batch sizes must match.
    """
    b, _, h, w = images.shape
    check_not_load_image_empty_mask(mask, h, w)
    if mask.shape[-2:] != (h, w):
        raise EditKitError(
            f"Mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is {w}x{h}. Give a mask of the image's size "
            "(e.g. the MASK of the same Load Image node) or resize the mask to match."
        )
    if mask.shape[0] not in (1, b):
        raise EditKitError(
            f"Got {mask.shape[0]} masks for {b} images. Give one mask for all images or one mask per image."
        )
    return mask.expand(b, -1, -1, -1)


def repeat_batch(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """Repeat each batch item ``times`` times in place (a,a,b,b, like diffusers' images per prompt)."""
    return tensor.repeat_interleave(times, dim=0) if times > 1 else tensor
