"""Sizes of the BEN2 network.

The published BEN2 Base checkpoint fixes every number in :class:`BEN2Config` (a Swin-B
backbone and a 128-channel multi-view decoder). The class is a dataclass rather than
constants so tests can build the same network at a size that runs in milliseconds and
still exercises every code path (shifted windows, several heads, window padding).
"""

from __future__ import annotations

from dataclasses import dataclass

# Side of the square patches the backbone embeds (fixed by the published architecture).
PATCH_SIZE = 4
# Input sides must be multiples of this: the image is split into 2x2 quarter views, the
# backbone reduces each view 32x, and the deepest level is split into quadrants once more.
SIZE_MULTIPLE = 2 * PATCH_SIZE * 8 * 2


@dataclass(frozen=True)
class BEN2Config:
    """Hyper-parameters; ``BEN2Config()`` is the published BEN2 Base network."""

    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: int = 4
    decoder_dim: int = 128
    decoder_heads: int = 1
    head_hidden_dim: int = 384
    context_pool_ratios: tuple[int, ...] = (1, 4, 8)
    refine_pool_ratios: tuple[int, ...] = (2, 4, 8)

    def __post_init__(self) -> None:
        sizes = (self.embed_dim, self.window_size, self.mlp_ratio, self.decoder_dim)
        if min(sizes + (self.decoder_heads, self.head_hidden_dim) + tuple(self.num_heads)) < 1:
            raise ValueError("BEN2 sizes, head counts and the window must be positive")
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError("BEN2 needs exactly four backbone stages (depths and num_heads of length 4)")
        for stage, heads in enumerate(self.num_heads):
            if self.stage_dims[stage] % heads:
                raise ValueError(f"stage {stage}: width {self.stage_dims[stage]} is not divisible by {heads} heads")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError("decoder_dim must be divisible by decoder_heads")

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channel width of each backbone stage (doubles at every patch merging)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @classmethod
    def tiny(cls) -> BEN2Config:
        """A 0.7M-parameter network with the same structure (shifted windows, several heads,
        window padding at every stage), fast enough for tests on a CPU."""
        return cls(
            embed_dim=16,
            depths=(2, 2, 2, 2),
            num_heads=(1, 2, 2, 4),
            window_size=4,
            decoder_dim=16,
            head_hidden_dim=24,
        )
