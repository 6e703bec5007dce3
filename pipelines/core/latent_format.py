"""How a model family's latents relate to its VAE's raw output, declared once per family.

ComfyUI's LATENT holds the VAE's **raw** output (what its encoder produces), so native VAEDecode,
LatentUpscale and SaveLatent work on EditKit latents and EditKit samplers accept native ones. The
transformers are trained on a normalised **model space**: ``(raw - shift) * scale``, with a scalar
scale/shift (FLUX.1: 0.3611 / 0.1159) or per-channel ones (Qwen-Image: ``(raw - mean) / std``).
Every sampler converts at the LATENT boundary through its family's :class:`LatentFormat`, the way
ComfyUI's ``comfy.latent_formats`` classes do (``preview`` names the ComfyUI class whose RGB factors
render step previews of this space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentFormat:
    channels: int
    spatial: int  # pixels per latent pixel
    scale: tuple[float, ...] | float
    shift: tuple[float, ...] | float
    preview: str  # ComfyUI latent_formats class for previews

    @classmethod
    def per_channel(cls, mean, std, spatial: int, preview: str) -> LatentFormat:
        """``(raw - mean) / std`` per channel (the diffusers ``latents_mean`` / ``latents_std`` convention)."""
        return cls(len(mean), spatial, tuple(1.0 / float(s) for s in std), tuple(float(m) for m in mean), preview)

    def _view(self, value, like: torch.Tensor) -> torch.Tensor | float:
        if isinstance(value, tuple):
            shape = [1, len(value)] + [1] * (like.ndim - 2)
            return torch.tensor(value, dtype=torch.float32, device=like.device).view(shape)
        return float(value)

    def to_model(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents ``[B,C,...]`` → model space, float32."""
        raw = raw.float()
        return (raw - self._view(self.shift, raw)) * self._view(self.scale, raw)

    def to_raw(self, model: torch.Tensor) -> torch.Tensor:
        """Model-space latents ``[B,C,...]`` → raw VAE space, float32."""
        model = model.float()
        return model / self._view(self.scale, model) + self._view(self.shift, model)
