"""The multi-view decoder blocks of BEN2 (an MVANet-style design, Yu et al., CVPR 2024).

Two kinds of cross-attention blocks exchange information between the four quarter views
and the global view of each image:

* :class:`GlobalContextBlock` (checkpoint name ``multifieldcrossatt``) runs once on the
  deepest features: the global view queries pooled summaries of the tiled quarter views,
  then each quarter queries its own quadrant of the refreshed global view;
* :class:`LocalRefineBlock` (``dec_blk1..4``) runs at every finer level: a saliency map from
  the global view gates the quarters, each quarter queries pooled summaries of its global
  quadrant, and the refreshed quarters are added back onto the global view.

Everything is batched over images: the published network loops over images in Python,
but every operation here acts on each image independently (attention per batch element,
instance norm per sample), so batching changes the speed and not the result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .views import maps_to_tokens, split_quadrants, split_token_quadrants, tile_quadrants, tokens_to_maps


def conv_norm_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    """3x3 conv → InstanceNorm (no learned parameters) → GELU; weights at index 0."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1), nn.InstanceNorm2d(out_dim), nn.GELU())


def sine_positions(height: int, width: int, channels: int, device) -> torch.Tensor:
    """``[h*w, channels]`` fixed sine/cosine position codes (DETR style, normalised to 2π).

    The first half of the channels encodes the row, the second half the column; within
    each half even channels are sines and odd channels cosines, with frequencies shared by
    each sine/cosine pair. Positions are pixel centres divided by the side length.
    """
    per_axis = channels // 2
    index = torch.arange(per_axis, dtype=torch.float32, device=device)
    wavelength = 10000.0 ** (2 * (index // 2) / per_axis)
    odd = (torch.arange(per_axis, device=device) % 2).bool()

    def encode(size: int) -> torch.Tensor:
        centres = torch.arange(size, dtype=torch.float32, device=device) + 0.5
        angles = (centres / (size + 1e-6) * (2 * math.pi))[:, None] / wavelength
        return torch.where(odd, angles.cos(), angles.sin())  # [size, per_axis]

    rows = encode(height)[:, None, :].expand(height, width, per_axis)
    cols = encode(width)[None, :, :].expand(height, width, per_axis)
    return torch.cat((rows, cols), dim=-1).reshape(height * width, channels)


class CrossAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names, batch-first.

    The checkpoint stores these blocks as ``nn.MultiheadAttention`` (packed ``in_proj``,
    ``out_proj``); re-implementing it keeps the keys while letting the decoder use
    batch-first tensors and ``scaled_dot_product_attention``. Inference only: no dropout.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``query`` ``[B,Lq,C]``, ``key``/``value`` ``[B,Lk,C]`` → ``[B,Lq,C]``."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = (
            F.linear(x, w, b).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v))
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out_proj(out)


def _pooled_grids(maps: torch.Tensor, ref_h: int, ref_w: int, ratios) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Average-pool ``maps`` to ``round(ref / ratio)`` per side for each ratio → (tokens, grid size).

    Python's ``round`` (half to even) is used on purpose: the published network sizes the
    pools that way, and the pooled grid sizes must match for the weights to mean the same.
    A ratio that rounds to zero (tiny inputs) contributes no tokens.
    """
    grids = []
    for r in ratios:
        size = (round(ref_h / r), round(ref_w / r))
        if 0 not in size:
            grids.append((maps_to_tokens(F.adaptive_avg_pool2d(maps, size)), size))
    return grids


class GlobalContextBlock(nn.Module):
    """Deepest-level exchange between the global view and the four quarter views."""

    def __init__(self, dim: int, num_heads: int, pool_ratios):
        super().__init__()
        self.pool_ratios = tuple(pool_ratios)
        # attention[0]: global queries the quarters; attention[1..4]: quarter i queries quadrant i.
        self.attention = nn.ModuleList(CrossAttention(dim, num_heads) for _ in range(5))
        self.linear1 = nn.Linear(dim, 2 * dim)
        self.linear2 = nn.Linear(2 * dim, dim)
        self.linear3 = nn.Linear(dim, 2 * dim)
        self.linear4 = nn.Linear(2 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, local: torch.Tensor, glob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``local`` ``[B,4,C,h,w]``, ``glob`` ``[B,C,h,w]`` → refreshed ``(local, glob)``."""
        _, _, dim, height, width = local.shape
        device = local.device
        tiled = tile_quadrants(local)  # [B, C, 2h, 2w]: the whole image at full detail

        grids = _pooled_grids(tiled, height, width, self.pool_ratios)
        keys = torch.cat([tokens for tokens, _ in grids], dim=1)
        key_pos = torch.cat([sine_positions(*size, dim, device) for _, size in grids], dim=0).to(keys.dtype)

        g = maps_to_tokens(glob)
        g_pos = sine_positions(height, width, dim, device).to(g.dtype)
        g = self.norm1(g + self.attention[0](g + g_pos, keys + key_pos, keys))
        g = self.norm2(g + self.linear2(F.gelu(self.linear1(g))))

        quadrants = split_token_quadrants(g, height, width)  # [B, 4, hw/4, C]
        q = maps_to_tokens(local)  # [B, 4, hw, C]
        attended = torch.stack(
            [self.attention[i + 1](q[:, i], quadrants[:, i], quadrants[:, i]) for i in range(4)], dim=1
        )
        q = self.norm1(q + attended)
        q = self.norm2(q + self.linear4(F.gelu(self.linear3(q))))
        return tokens_to_maps(q, height, width), tokens_to_maps(g, height, width)


class LocalRefineBlock(nn.Module):
    """One decoder level: global-guided refinement of the four quarter views."""

    def __init__(self, dim: int, num_heads: int, pool_ratios):
        super().__init__()
        self.pool_ratios = tuple(pool_ratios)
        self.attention = nn.ModuleList(CrossAttention(dim, num_heads) for _ in range(4))
        self.linear3 = nn.Linear(dim, 2 * dim)
        self.linear4 = nn.Linear(2 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.sal_conv = nn.Conv2d(dim, 1, kernel_size=1)

    def forward(self, local: torch.Tensor, glob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``local`` ``[B,4,C,h,w]``, ``glob`` ``[B,C,h,w]`` → refreshed ``(local, glob)``."""
        batch, _, dim, height, width = local.shape
        # Gate each quarter by where the global view sees the object.
        saliency = torch.sigmoid(self.sal_conv(glob))
        saliency = F.interpolate(saliency, size=(2 * height, 2 * width), mode="nearest")
        local = local * split_quadrants(saliency)

        # Summaries of each global quadrant at several scales, as keys/values for its quarter.
        quadrants = split_quadrants(glob).flatten(0, 1)  # [B*4, C, h/2, w/2]
        keys = torch.cat([tokens for tokens, _ in _pooled_grids(quadrants, height, width, self.pool_ratios)], dim=1)
        keys = keys.unflatten(0, (batch, 4))  # [B, 4, n, C]

        q = maps_to_tokens(local)  # [B, 4, hw, C]
        attended = torch.stack([self.attention[i](q[:, i], keys[:, i], keys[:, i]) for i in range(4)], dim=1)
        q = self.norm1(q + attended)
        q = self.norm2(q + self.linear4(F.gelu(self.linear3(q))))
        local = tokens_to_maps(q, height, width)
        glob = glob + F.interpolate(tile_quadrants(local), size=(height, width), mode="nearest")
        return local, glob
