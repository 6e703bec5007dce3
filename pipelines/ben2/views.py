"""The 2x2 quarter split that BEN2's multi-view design is built on.

BEN2 looks at every image as four full-resolution quarter crops plus one half-resolution
global view. The same split is applied again inside the decoder to pair each quarter with
the matching quadrant of the global feature map, so the quadrant order (top-left,
top-right, bottom-left, bottom-right) must be the same everywhere; keeping both directions
of the split in one place guarantees that.
"""

from __future__ import annotations

import torch
from einops import rearrange


def split_quadrants(maps: torch.Tensor) -> torch.Tensor:
    """``[B,C,2h,2w]`` → ``[B,4,C,h,w]`` in the order TL, TR, BL, BR."""
    return rearrange(maps, "b c (qy h) (qx w) -> b (qy qx) c h w", qy=2, qx=2)


def tile_quadrants(quadrants: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_quadrants`: ``[B,4,C,h,w]`` → ``[B,C,2h,2w]``."""
    return rearrange(quadrants, "b (qy qx) c h w -> b c (qy h) (qx w)", qy=2, qx=2)


def split_token_quadrants(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Row-major tokens ``[B,h*w,C]`` of an ``h x w`` map → ``[B,4,(h/2)*(w/2),C]`` per quadrant."""
    return rearrange(tokens, "b (qy y qx x) c -> b (qy qx) (y x) c", qy=2, qx=2, y=height // 2, x=width // 2)


def maps_to_tokens(maps: torch.Tensor) -> torch.Tensor:
    """``[...,C,h,w]`` → ``[...,h*w,C]`` (row-major tokens)."""
    return maps.flatten(-2).transpose(-1, -2)


def tokens_to_maps(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`maps_to_tokens`."""
    return tokens.transpose(-1, -2).unflatten(-1, (height, width))
