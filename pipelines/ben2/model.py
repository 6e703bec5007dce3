"""BEN2 Base: the network whose state dict is the published BEN2 checkpoint.

Forward pass, per image: the normalised image is cut into four full-resolution quarters and
downscaled once into a half-resolution global view; the Swin backbone encodes the five
views together; the decoder fuses them coarse to fine (:mod:`.decoder`); the four finest
quarter maps are tiled back into one map, merged with the global view and with a shallow
full-resolution convolution of the input, upsampled 4x and turned into a sigmoid mask.

Submodule names are those of the checkpoint. ``sideout1..5`` are trained side outputs
used only as training losses: they are kept so the published file loads strictly, and are
never evaluated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SIZE_MULTIPLE, BEN2Config
from .decoder import GlobalContextBlock, LocalRefineBlock, conv_norm_gelu
from .swin import SwinBackbone
from .views import split_quadrants, tile_quadrants

VIEWS_PER_IMAGE = 5  # four quarters + one global view


def _conv3x3(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1))


def _resize_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear")


class BEN2Base(nn.Module):
    """ImageNet-normalised ``[B,3,H,W]`` (H, W multiples of 128) → ``[B,1,H,W]`` mask in 0..1."""

    def __init__(self, config: BEN2Config | None = None):
        super().__init__()
        self.config = config = config or BEN2Config()
        dim = config.decoder_dim
        stage_dims = config.stage_dims

        self.backbone = SwinBackbone(config)
        # Registration order follows the checkpoint's key order.
        for level in range(5, 0, -1):
            self.add_module(f"sideout{level}", _conv3x3(dim, 1))
        # output1 reads the patch embedding, output2..5 the four stage outputs.
        level_dims = (config.embed_dim, *stage_dims)
        for level in range(5, 0, -1):
            self.add_module(f"output{level}", conv_norm_gelu(level_dims[level - 1], dim))

        self.multifieldcrossatt = GlobalContextBlock(dim, config.decoder_heads, config.context_pool_ratios)
        for level in range(1, 5):
            self.add_module(f"conv{level}", conv_norm_gelu(dim, dim))
        for level in range(1, 5):
            self.add_module(f"dec_blk{level}", LocalRefineBlock(dim, config.decoder_heads, config.refine_pool_ratios))

        hidden = config.head_hidden_dim
        self.insmask_head = nn.Sequential(
            nn.Conv2d(dim, hidden, kernel_size=3, padding=1),
            nn.InstanceNorm2d(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            nn.InstanceNorm2d(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, dim, kernel_size=3, padding=1),
        )
        self.shallow = _conv3x3(3, dim)
        self.upsample1 = conv_norm_gelu(dim, dim)
        self.upsample2 = conv_norm_gelu(dim, dim)
        self.output = _conv3x3(dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        if channels != 3 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(
                f"BEN2 takes [B,3,H,W] with H and W multiples of {SIZE_MULTIPLE}; got {tuple(images.shape)} "
                "(use pipelines.ben2.inference, which resizes)"
            )
        shallow = self.shallow(images)
        # The full-resolution shallow features are only ever added at 1/4 and 1/2 of the
        # input size: take those two resized copies now so the full-size map is freed
        # before the backbone runs (same arithmetic, much lower peak memory).
        quarter = (height // 4, width // 4)
        shallow_small = F.interpolate(shallow, size=quarter, mode="bilinear")
        shallow_half = F.interpolate(shallow, size=(height // 2, width // 2), mode="bilinear")
        del shallow

        global_view = F.interpolate(images, scale_factor=0.5, mode="bilinear")
        views = torch.cat((split_quadrants(images), global_view.unsqueeze(1)), dim=1)
        features = self.backbone(views.flatten(0, 1))  # [B*5, C, h, w] per level, quarters first
        del views, global_view

        def split(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            maps = maps.unflatten(0, (batch, VIEWS_PER_IMAGE))
            return maps[:, :4], maps[:, 4]

        def join(local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
            return torch.cat((local, glob.unsqueeze(1)), dim=1).flatten(0, 1)

        levels = [getattr(self, f"output{i + 1}")(f) for i, f in enumerate(features)]
        del features
        decoded = join(*self.multifieldcrossatt(*split(levels[4])))
        for level in (4, 3, 2, 1):
            maps = levels[level - 1] + _resize_like(decoded, levels[level - 1])
            refined = join(*getattr(self, f"dec_blk{level}")(*split(maps)))
            decoded = getattr(self, f"conv{level}")(refined)
        del levels, maps, refined

        # Fuse: tiled quarters (1/4 of the input size) + global view, then upsample 4x.
        local, glob = split(decoded)
        fused = tile_quadrants(local)
        fused = self.insmask_head(fused + _resize_like(glob, fused))
        fused = self.upsample1(F.interpolate(fused + shallow_small, scale_factor=2, mode="nearest"))
        fused = F.interpolate(fused + shallow_half, scale_factor=2, mode="nearest")
        # Full resolution: apply layer by layer so each input is freed as soon as it is used.
        for layer in (*self.upsample2, *self.output):
            fused = layer(fused)
        return torch.sigmoid(fused)
