"""Swin Transformer backbone in the layout of the BEN2 Base checkpoint.

This is the detection/segmentation flavour of Swin (Liu et al., 2021): feature maps are
zero-padded on the right and bottom to a multiple of the window, every second block uses
windows shifted by half a window (even when the map is smaller than a window), and each
stage's output is layer-normalised before it is handed to the decoder. Attribute names
follow the published state dict (``patch_embed``, ``layers.S.blocks.i.attn.qkv`` ...), so the
checkpoint loads with a strict ``load_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import PATCH_SIZE, BEN2Config

# Additive attention bias between tokens that the cyclic shift brought together from
# different image regions; large enough that softmax gives them ~zero weight.
_SHIFT_MASK_VALUE = -100.0


def relative_position_index(window: int) -> torch.Tensor:
    """``[T,T]`` int64 (T = window²): row of the bias table for each query/key token pair.

    The table has one row per relative offset ``(dy, dx)`` in ``-(window-1)..window-1``,
    stored row-major, so the row is ``(dy + window - 1) * (2 * window - 1) + dx + window - 1``.
    """
    coords = torch.arange(window)
    ys = coords.repeat_interleave(window)  # token t sits at (t // window, t % window)
    xs = coords.repeat(window)
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def to_windows(maps: torch.Tensor, window: int) -> torch.Tensor:
    """``[B,H,W,C]`` → ``[B*nW, window², C]``; windows ordered row-major within each image."""
    return rearrange(maps, "b (ny wy) (nx wx) c -> (b ny nx) (wy wx) c", wy=window, wx=window)


def from_windows(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`to_windows` for a padded map of ``height x width``."""
    return rearrange(
        windows, "(b ny nx) (wy wx) c -> b (ny wy) (nx wx) c", ny=height // window, nx=width // window, wy=window
    )


def shifted_window_mask(height: int, width: int, window: int, shift: int, device, dtype) -> torch.Tensor:
    """``[nW,T,T]`` additive mask for shifted windows of a padded ``height x width`` map.

    After the cyclic shift, the last window row/column mixes tokens from up to three bands
    of the image (the body, the band that was last before the shift, and the wrapped
    band); tokens may only attend within their own band.
    """

    def bands(size: int) -> torch.Tensor:
        label = torch.zeros(size, dtype=torch.int64, device=device)
        label[size - window :] = 1
        label[size - shift :] = 2
        return label

    region = bands(height)[:, None] * 3 + bands(width)[None, :]
    region = to_windows(region[None, :, :, None], window).squeeze(-1)  # [nW, T]
    different = region[:, :, None] != region[:, None, :]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, _SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned relative-position bias."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Persistent: the published checkpoint stores it, and a strict load expects it.
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        """``[heads,T,T]`` bias gathered from the table."""
        tokens = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """``windows``: ``[B*nW,T,C]``; ``shift_mask``: ``[nW,T,T]`` or ``None``."""
        count, tokens, dim = windows.shape
        q, k, v = self.qkv(windows).view(count, tokens, 3, self.num_heads, dim // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B*nW, heads, T, head_dim]
        bias = self.position_bias().to(q.dtype)
        if shift_mask is not None:
            # Windows are ordered image by image, and every image has the same shift mask.
            # Four-dimensional inputs let scaled_dot_product_attention use its fused kernels.
            bias = bias.unsqueeze(0) + shift_mask.unsqueeze(1).to(q.dtype)  # [nW, heads, T, T]
            bias = bias.repeat(count // shift_mask.shape[0], 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(count, tokens, dim))


class FeedForward(nn.Module):
    """Two linear layers with GELU between them (the transformer MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm window attention + MLP, with optionally shifted windows."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: int):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, height: int, width: int, shift_mask: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x.shape
        window, shift = self.window, self.shift
        maps = self.norm1(x).view(batch, height, width, dim)
        # Padding happens after the norm: padded tokens are zeros and, as in the
        # published network, they are not masked out of the attention.
        maps = F.pad(maps, (0, 0, 0, -width % window, 0, -height % window))
        padded_h, padded_w = maps.shape[1:3]
        if shift:
            maps = torch.roll(maps, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(to_windows(maps, window), shift_mask if shift else None)
        maps = from_windows(windows, window, padded_h, padded_w)
        if shift:
            maps = torch.roll(maps, shifts=(shift, shift), dims=(1, 2))
        x = x + maps[:, :height, :width].reshape(batch, height * width, dim)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Halves the resolution: each 2x2 token neighbourhood becomes one token of twice the width."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        maps = x.view(x.shape[0], height, width, x.shape[-1])
        # Channel order of the published weights: (dy, dx) = (0,0), (1,0), (0,1), (1,1).
        merged = rearrange(maps, "b (h dy) (w dx) c -> b (h w) (dx dy c)", dy=2, dx=2)
        return self.reduction(self.norm(merged))


class SwinStage(nn.Module):
    """Blocks at one resolution (alternating plain and shifted windows), then optional merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: int, downsample: bool):
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else self.shift, mlp_ratio) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the stage output at this resolution and the merged input of the next stage."""
        padded_h, padded_w = -(-height // self.window) * self.window, -(-width // self.window) * self.window
        mask = shifted_window_mask(padded_h, padded_w, self.window, self.shift, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, height, width, mask)
        merged = self.downsample(x, height, width) if self.downsample is not None else None
        return x, merged


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection followed by a LayerNorm over channels."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.proj(images)
        return self.norm(maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SwinBackbone(nn.Module):
    """Returns five ``[N,C,h,w]`` maps: the patch embedding and each stage's normalised output."""

    def __init__(self, config: BEN2Config):
        super().__init__()
        dims = config.stage_dims
        self.patch_embed = PatchEmbed(PATCH_SIZE, config.embed_dim)
        last = len(dims) - 1
        self.layers = nn.ModuleList(
            SwinStage(dims[s], config.depths[s], config.num_heads[s], config.window_size, config.mlp_ratio, s < last)
            for s in range(len(dims))
        )
        for s, dim in enumerate(dims):
            self.add_module(f"norm{s}", nn.LayerNorm(dim))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        embedded = self.patch_embed(images)
        features = [embedded]
        height, width = embedded.shape[-2:]
        tokens = embedded.flatten(2).transpose(1, 2)
        for s, stage in enumerate(self.layers):
            out, tokens = stage(tokens, height, width)
            out = getattr(self, f"norm{s}")(out)
            features.append(out.transpose(1, 2).unflatten(-1, (height, width)))
            height, width = height // 2, width // 2
        return features
