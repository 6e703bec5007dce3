"""Pictures sent as base64 text (JSON APIs) → IMAGE and MASK, with ComfyUI's Load Image conventions.

A service that posts one API prompt per request cannot upload a file first, so the picture
travels inside the prompt as base64 (optionally as a ``data:image/...;base64,`` URL). The result
follows ComfyUI's LoadImage: EXIF orientation applied, RGB in 0..1, MASK = 1 - alpha (so
transparent pixels are the ones to change); a picture without alpha gets an all-zero mask of its
own size (LoadImage gives a 64x64 placeholder, which no EditKit node needs). Only PNG, JPEG and
WebP are accepted, and the pixel count is checked from the header before anything is decoded,
so an oversized or malicious picture costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EditKitError

FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_PIXELS = 4096 * 4096
_DATA_URL = re.compile(r"^data:([\w/+.-]*)(;[\w=.-]+)*;base64,", re.IGNORECASE)


def decode_base64(data: str) -> bytes:
    """The bytes of a base64 string or data URL; whitespace and line breaks are ignored."""
    if not isinstance(data, str) or not data.strip():
        raise EditKitError("No picture: 'data' is empty. Put the picture's base64 text (or a data: URL) in it.")
    text = data.strip()
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end():]
    elif text.lower().startswith("data:"):
        raise EditKitError("'data' is a data: URL that is not base64 (it needs ';base64,' before the payload).")
    text = re.sub(r"\s+", "", text)
    text = text.replace("-", "+").replace("_", "/")  # the URL-safe alphabet, as some clients send it
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EditKitError(f"'data' is not valid base64 ({exc}). Send the picture file's bytes base64-encoded.") \
            from exc


def _planes(picture: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB ``[H,W,3]`` and alpha ``[H,W]`` (or None) as float32 in 0..1."""
    if picture.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale PNG
        grey = np.asarray(picture, dtype=np.float32) / 65535.0
        return np.repeat(grey[..., None], 3, axis=-1).clip(0, 1), None
    has_alpha = "A" in picture.getbands() or (picture.mode == "P" and "transparency" in picture.info)
    if has_alpha:
        rgba = np.asarray(picture.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3], rgba[..., 3]
    return np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0, None


def load_base64_image(data: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE ``[1,H,W,3]`` and MASK ``[1,H,W]`` from base64 text."""
    raw = decode_base64(data)
    try:
        picture = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:
        raise EditKitError(f"The picture is too large to decode safely ({exc}). Downscale it before sending.") from exc
    except UnidentifiedImageError as exc:
        head = raw[:8].hex(" ")
        raise EditKitError(
            f"'data' decodes to {len(raw)} bytes that are not a picture (they start with {head}). Send a PNG, JPEG or "
            "WebP file, base64-encoded."
        ) from exc
    with picture:
        if picture.format not in FORMATS:
            raise EditKitError(f"The picture is {picture.format}; send PNG, JPEG or WebP.")
        width, height = picture.size
        if width * height > max_pixels:
            raise EditKitError(
                f"The picture is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}. "
                "Downscale it before sending, or raise max_pixels."
            )
        try:
            picture.seek(0)  # animated WebP / APNG: the first frame
            picture = ImageOps.exif_transpose(picture)
            rgb, alpha = _planes(picture)
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
            raise EditKitError(f"The {picture.format} picture is damaged and cannot be decoded ({exc}).") from exc
    image = torch.from_numpy(np.ascontiguousarray(rgb))[None]
    mask = torch.zeros(rgb.shape[:2], dtype=torch.float32) if alpha is None else 1.0 - torch.from_numpy(alpha)
    return image, mask[None]
