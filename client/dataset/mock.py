"""``--mock``: deterministic stand-ins for the layered decomposition and the edit model.

They exercise every path of the factory with no server and no model (CI runs the whole flow this
way). The decomposition splits the picture into a background layer and luminance bands; the edit
recolours the masked region according to the instruction. A fixed, documented share of edits is
deliberately bad, chosen from a hash of the sample id and instruction so the same ones fail on
every run, so QA always has something to flag:

======================  ===============================================  ====================
``bad`` kind            what the mock returns                            QA check that fails
======================  ===============================================  ====================
``blank``               a flat grey picture                              ``blank``
``copy``                the source unchanged                             ``near_copy``
``resized``             the picture 8 pixels narrower                    ``size``
``leak``                the whole picture recoloured, mask ignored       ``outside_mask``
======================  ===============================================  ====================
"""

from __future__ import annotations

import hashlib

import numpy as np

BAD_KINDS = ("blank", "copy", "resized", "leak")
BAD_EVERY = 10  # one edit in ten is bad, the kinds in turn


def _digest(*parts: str) -> int:
    return int(hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:12], 16)


def bad_kind(sample_id: str, instruction: str) -> str | None:
    value = _digest(sample_id, instruction)
    if value % BAD_EVERY:
        return None
    return BAD_KINDS[(value // BAD_EVERY) % len(BAD_KINDS)]


def decompose(rgb: np.ndarray, layers: int) -> list[np.ndarray]:
    """``layers`` RGBA layers ``[H,W,4]``: an opaque background, then luminance bands (darkest first)."""
    luminance = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = [np.concatenate([rgb, np.ones_like(luminance)[..., None]], axis=-1)]
    bands = max(1, layers - 1)
    edges = np.quantile(luminance, np.linspace(0.0, 1.0, bands + 1))
    for k in range(bands):
        low, high = edges[k], edges[k + 1]
        inside = (luminance >= low) & ((luminance <= high) if k == bands - 1 else (luminance < high))
        out.append(np.concatenate([rgb, inside.astype(np.float32)[..., None]], axis=-1))
    return out[:layers]


def edit(rgb: np.ndarray, mask: np.ndarray, sample_id: str, instruction: str) -> np.ndarray:
    """The mock edit of ``rgb`` inside ``mask`` (1 = change), or a deliberately bad result."""
    kind = bad_kind(sample_id, instruction)
    if kind == "blank":
        return np.full_like(rgb, 0.5)
    if kind == "copy":
        return rgb.copy()
    rotate = 1 + _digest(instruction) % 2  # RGB → GBR or BRG: a visible recolouring
    recoloured = np.roll(rgb, rotate, axis=-1) * 0.8 + 0.1
    if kind == "leak":
        return recoloured
    m = mask[..., None].astype(np.float32)
    result = rgb * (1.0 - m) + recoloured * m
    if kind == "resized":
        return result[:, :-8] if result.shape[1] > 16 else result[:-8]
    return result
