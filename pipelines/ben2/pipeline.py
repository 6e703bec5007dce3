"""Background removal end to end: BEN2 mask → mask shaping → foreground colour → output image.

Each chunk of the batch goes through every step on the compute device and is copied to
the host once, so a long video batch never holds more than one chunk of full-resolution
intermediates on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.images import image_to_nchw, mask_to_nchw, match_mask_to_images
from ..core.runtime import Component, Runtime
from .inference import DEFAULT_RESOLUTION, activation_bytes, iterate_chunks, predict_chunk, processing_size
from .postprocess import composite, estimate_foreground, refine_mask


@dataclass(frozen=True)
class RemovalSettings:
    """What the user chose; see the node tooltips for the meaning of each field.

    ``background`` is an RGB colour in 0..1 for a composited IMAGE, or ``None`` for RGBA.
    """

    resolution: int = DEFAULT_RESOLUTION
    keep_aspect: bool = False
    batch_size: int = 4
    threshold: float = 0.0
    grow: int = 0
    feather: float = 0.0
    invert: bool = False
    refine_foreground: bool = True
    background: tuple[float, float, float] | None = (1.0, 1.0, 1.0)


def cut_out(
    images: torch.Tensor,
    alpha: torch.Tensor,
    *,
    refine_foreground: bool,
    background: tuple[float, float, float] | None,
    matte: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B,3,H,W]`` images and ``[B,1,H,W]`` mask → IMAGE ``[B,H,W,3|4]`` (see :func:`.postprocess.composite`).

    ``alpha`` is the mask the picture is cut out with (possibly thresholded, grown, feathered);
    ``matte`` is the true soft matte of the kept region, from which the foreground colours are
    estimated (default: ``alpha``). They must be kept apart: blur-fusion solves
    ``image = matte * F + (1 - matte) * B`` for ``F``, which only holds for the real matte. Fed a
    feathered mask it "removes background" from pixels that are fully subject and changes their
    colour; fed a shrunk mask it pulls the background into the edge.
    """
    if refine_foreground:
        foreground = estimate_foreground(images, alpha if matte is None else matte)
    else:
        foreground = images
    return composite(foreground, alpha, background)


def remove_background(
    component: Component, images: torch.Tensor, *, runtime: Runtime, settings: RemovalSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE ``[B,H,W,C]`` → (IMAGE ``[B,H,W,3|4]``, MASK ``[B,H,W]``), both float32 on the host.

    MASK is 1 on the subject (0 with ``invert``); the IMAGE keeps what the mask selects. With
    ``refine_foreground`` the edge colours are estimated from the network's raw matte, not from
    the thresholded / grown / feathered MASK (see :func:`cut_out`).
    """
    images = image_to_nchw(images)
    count, _, height, width = images.shape
    size = processing_size(height, width, settings.resolution, settings.keep_aspect)
    host = runtime.intermediate_device
    channels = 3 if settings.background is not None else 4
    out_images = torch.empty((count, height, width, channels), dtype=torch.float32, device=host)
    out_masks = torch.empty((count, height, width), dtype=torch.float32, device=host)
    chunks = iterate_chunks(
        component,
        count,
        runtime=runtime,
        batch_size=settings.batch_size,
        memory_per_image=activation_bytes(*size, 1, component.dtype),
    )
    for batch, device in chunks:
        chunk = images[batch].to(device)
        matte = predict_chunk(component.module, chunk, size, component.dtype)
        alpha = refine_mask(
            matte,
            threshold=settings.threshold,
            grow=settings.grow,
            feather=settings.feather,
            invert=settings.invert,
        )
        # Colours come from the network's own matte (of the kept region: the background's when inverted);
        # the shaped mask only decides how much of each pixel is kept.
        kept_matte = 1 - matte if settings.invert else matte
        cut = cut_out(
            chunk, alpha, refine_foreground=settings.refine_foreground, background=settings.background,
            matte=kept_matte,
        )
        out_images[batch] = cut.to(host)
        out_masks[batch] = alpha[:, 0].to(host)
    return out_images, out_masks


def apply_matte(
    images: torch.Tensor, masks: torch.Tensor, *, refine_foreground: bool, background: tuple[float, float, float] | None
) -> torch.Tensor:
    """Cut out IMAGE ``[B,H,W,C]`` with MASK ``[B|1,H,W]`` (1 = keep) from any source, on the host."""
    images = image_to_nchw(images)
    alpha = match_mask_to_images(mask_to_nchw(masks), images)
    return cut_out(images, alpha, refine_foreground=refine_foreground, background=background)
