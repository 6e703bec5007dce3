"""Running BEN2 on ComfyUI images: resize, normalise, batch in chunks, resize back.

BEN2 was trained on 1024x1024 inputs (the reference stretches every image to that square),
and its multi-view split needs sides that are multiples of 128. Images of any size are
therefore resized to a processing size, predicted, and the mask is resized back to the
input size. Masks stay float end to end: no 8-bit rounding and no per-image min-max
stretch (which turns an empty prediction into noise and a constant one into NaN).

Chunks run under the host's :class:`~..runtime.Runtime`: one ``acquire`` for the whole
batch, then per chunk an interrupt check, one host transfer and one progress step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..core.errors import EditKitError
from ..core.images import image_to_nchw
from ..core.runtime import Component, Runtime
from .config import SIZE_MULTIPLE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_RESOLUTION = 1024

# Peak activation memory of one image, in elements per processed pixel. Measured on the
# full network (fp32, CPU, 1024x1024, python -m scripts.bench ben2): ~470, dominated by the
# 128-channel full-resolution maps of the last upsampling stage. Rounded up because under
# fp16 autocast normalisation outputs stay fp32, and for allocator slack.
_ACTIVATION_ELEMENTS_PER_PIXEL = 768


def processing_size(height: int, width: int, resolution: int, keep_aspect: bool) -> tuple[int, int]:
    """The size the network sees: ``resolution`` squared, or the long side at ``resolution``.

    With ``keep_aspect`` the short side is rounded (half up) to a multiple of 128, at least 128.
    """
    if resolution < SIZE_MULTIPLE or resolution % SIZE_MULTIPLE:
        raise EditKitError(
            f"BEN2 resolution must be a multiple of {SIZE_MULTIPLE} (at least {SIZE_MULTIPLE}); got {resolution}. "
            f"Use e.g. {DEFAULT_RESOLUTION}, the resolution BEN2 was trained at."
        )
    if not keep_aspect:
        return resolution, resolution
    scale = resolution / max(height, width)
    return tuple(
        max(SIZE_MULTIPLE, math.floor(side * scale / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE) for side in (height, width)
    )


def activation_bytes(height: int, width: int, batch: int, dtype: torch.dtype) -> int:
    """Estimated peak activation memory for ``batch`` images processed at ``height x width``."""
    element = torch.empty((), dtype=dtype).element_size()
    return batch * height * width * _ACTIVATION_ELEMENTS_PER_PIXEL * element


def normalize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B,3,H,W]`` in 0..1 → ImageNet-normalised ``[B,3,*size]`` float32.

    Antialiased bicubic resampling stands in for the reference's PIL Lanczos resize.
    """
    images = images.float()
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B,1,h,w]`` → ``[B,1,*size]`` float32 in 0..1 (bilinear, antialiased when shrinking)."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False, antialias=True)
    return masks.clamp(0, 1)


def _precision_context(device: torch.device, dtype: torch.dtype):
    """fp16/bf16 on CUDA run under autocast, like the reference: convolutions and matmuls in
    half precision, normalisations and softmax in fp32 (pure fp16 would risk overflow there)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict_chunk(
    module: torch.nn.Module, images: torch.Tensor, size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Masks ``[b,1,H,W]`` float32 for ``[b,3,H,W]`` images in 0..1, on the images' device."""
    inputs = normalize_images(images, size).to(dtype)
    with _precision_context(images.device, dtype):
        masks = module(inputs)
    return resize_masks(masks, tuple(images.shape[-2:]))


def iterate_chunks(
    component: Component,
    count: int,
    *,
    runtime: Runtime,
    batch_size: int,
    memory_per_image: int,
) -> Iterator[tuple[slice, torch.device]]:
    """Acquire ``component`` once, then yield ``(batch slice, device)`` per chunk.

    Interruption is checked before each chunk and progress advances after it, so the
    caller only does the tensor work.
    """
    if batch_size < 1:
        raise EditKitError(f"batch_size must be at least 1; got {batch_size}.")
    device = runtime.acquire(component, memory_required=memory_per_image * min(batch_size, count))
    progress = runtime.progress(-(-count // batch_size))
    for start in range(0, count, batch_size):
        runtime.check_interrupt()
        yield slice(start, min(start + batch_size, count)), device
        progress.update()


def predict_masks(
    component: Component,
    images: torch.Tensor,
    *,
    runtime: Runtime,
    resolution: int = DEFAULT_RESOLUTION,
    keep_aspect: bool = False,
    batch_size: int = 4,
) -> torch.Tensor:
    """BEN2 masks for a ComfyUI IMAGE batch: ``[B,H,W,C]`` in 0..1 → ``[B,H,W]`` float32, 1 = foreground.

    Results land on the runtime's intermediate device (the CPU in ComfyUI).
    """
    images = image_to_nchw(images)
    count, _, height, width = images.shape
    size = processing_size(height, width, resolution, keep_aspect)
    out = torch.empty((count, height, width), dtype=torch.float32, device=runtime.intermediate_device)
    chunks = iterate_chunks(
        component,
        count,
        runtime=runtime,
        batch_size=batch_size,
        memory_per_image=activation_bytes(*size, 1, component.dtype),
    )
    for batch, device in chunks:
        masks = predict_chunk(component.module, images[batch].to(device), size, component.dtype)
        out[batch] = masks[:, 0].to(out.device)
    return out
