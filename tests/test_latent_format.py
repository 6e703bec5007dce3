"""Latent formats: the raw VAE space of ComfyUI's LATENT against each family's model space."""

from __future__ import annotations

import torch

from editkit.pipelines.core.latent_format import LatentFormat
from editkit.pipelines.flux.vae import FLUX_LATENT


def test_flux_scalar_format_matches_comfyui_numbers():
    raw = torch.randn(2, 16, 3, 5)
    torch.testing.assert_close(FLUX_LATENT.to_model(raw), (raw - 0.1159) * 0.3611)
    torch.testing.assert_close(FLUX_LATENT.to_raw(FLUX_LATENT.to_model(raw)), raw, atol=1e-6, rtol=1e-6)


def test_per_channel_format_normalises_each_channel_and_any_rank():
    mean, std = [0.5 * i for i in range(4)], [1.0 + i for i in range(4)]
    fmt = LatentFormat.per_channel(mean, std, spatial=8, preview="Wan21")
    for shape in ((2, 4, 3, 3), (1, 4, 1, 3, 3)):  # image latents and video-VAE latents with a frame axis
        raw = torch.randn(shape)
        expected = torch.stack([(raw[:, c] - mean[c]) / std[c] for c in range(4)], dim=1)
        torch.testing.assert_close(fmt.to_model(raw), expected)
        torch.testing.assert_close(fmt.to_raw(fmt.to_model(raw)), raw, atol=1e-6, rtol=1e-6)
