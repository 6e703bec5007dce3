"""Small image measurements for the factory's QA, on numpy arrays (no torch in the client).

* a perceptual hash (the DCT "pHash": 32×32 greyscale, the 8×8 lowest frequencies against their
  median) to find near-copies and duplicates by Hamming distance;
* PSNR and SSIM restricted to the pixels outside an edit mask, because an edit is supposed to change
  the inside and nothing else. SSIM uses the usual 7×7 uniform window on greyscale (the Wang et al.
  constants), averaged over the outside pixels.

Written here rather than taken from scikit-image/imagehash to keep the client's dependencies to
Pillow and numpy; each is a few lines of well-known arithmetic, tested against direct formulas.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def load_rgb(path: Path) -> np.ndarray:
    """``[H,W,3]`` float32 in 0..1, EXIF rotation applied (as ComfyUI's Load Image)."""
    with Image.open(path) as picture:
        picture = ImageOps.exif_transpose(picture)
        return np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0


def load_mask(path: Path) -> np.ndarray:
    """``[H,W]`` float32 in 0..1 from a greyscale (or RGB) picture; white = the edited region."""
    with Image.open(path) as picture:
        return np.asarray(picture.convert("L"), dtype=np.float32) / 255.0


def png_bytes(array: np.ndarray) -> bytes:
    """Encode ``[H,W]``, ``[H,W,3]`` or ``[H,W,4]`` floats in 0..1 as PNG."""
    data = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    mode = "L" if data.ndim == 2 else {3: "RGB", 4: "RGBA"}[data.shape[-1]]
    buffer = io.BytesIO()
    Image.fromarray(data, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def grey(array: np.ndarray) -> np.ndarray:
    return array if array.ndim == 2 else array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(array: np.ndarray) -> int:
    """64-bit perceptual hash of a picture."""
    small = Image.fromarray((grey(array) * 255).astype(np.uint8), "L").resize((32, 32), Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.float64)
    low = (_DCT32 @ pixels @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def beyond_mask(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The edit with the change its mask allows taken out: a pixel with mask ``m`` may differ from the
    source by up to ``m`` (the edit blends its result in with the soft mask), so only the excess stays.
    Where the mask is 1 the result equals the source; where it is 0 it equals the edit."""
    allowed = np.clip(mask, 0.0, 1.0)[..., None] if edited.ndim == 3 else np.clip(mask, 0.0, 1.0)
    diff = edited - source
    return source + np.sign(diff) * np.maximum(np.abs(diff) - allowed, 0.0)


def _weights(where: np.ndarray | None, shape) -> np.ndarray:
    if where is None:
        return np.ones(shape, np.float64)
    return where.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB (inf for identical pixels); ``where`` (booleans or weights in 0..1) weights each pixel."""
    diff = (a - b) ** 2
    if diff.ndim == 3:
        diff = diff.mean(-1)
    weights = _weights(where, diff.shape)
    total = float(weights.sum())
    if total <= 0:
        return float("inf")
    mse = float((diff * weights).sum() / total)
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def _box(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over a k×k window (edges padded by reflection), via cumulative sums."""
    pad = k // 2
    p = np.pad(x, pad, mode="reflect")
    c = np.cumsum(np.cumsum(p, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def ssim(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None, window: int = 7) -> float:
    """Mean SSIM (greyscale, uniform window), each pixel's score weighted by ``where`` (booleans or
    weights in 0..1). QA compares the source with :func:`beyond_mask`'s picture, which equals the source
    wherever the mask allowed the change, so windows reaching into the edited region see no change there."""
    x, y = grey(a).astype(np.float64), grey(b).astype(np.float64)
    if min(x.shape) < window:
        window = max(1, min(x.shape) | 1) if min(x.shape) > 1 else 1
    c1, c2 = 0.01**2, 0.03**2
    mx, my = _box(x, window), _box(y, window)
    vx = _box(x * x, window) - mx * mx
    vy = _box(y * y, window) - my * my
    cov = _box(x * y, window) - mx * my
    score = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    weights = _weights(where, score.shape)
    total = float(weights.sum())
    if total <= 0:
        return 1.0
    return float((score * weights).sum() / total)
