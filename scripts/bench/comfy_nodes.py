"""Benchmark-only ComfyUI nodes: fixed random conditioning and pictures in, a sink out (no text encoders,
so a workflow times the sampler and the VAE alone). Registered only inside the benchmark's child process."""

from __future__ import annotations

import torch


class EditKitBenchInputs:
    """Fixed random conditioning (``tokens`` x ``width`` states + pooled), a picture and a centred mask."""

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "IMAGE", "MASK")
    FUNCTION = "make"
    CATEGORY = "EditKit/benchmark"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"size": ("INT", {"default": 512}), "tokens": ("INT", {"default": 512}),
                             "width": ("INT", {"default": 4096}), "pooled": ("INT", {"default": 768}),
                             "guidance": ("FLOAT", {"default": 30.0})}}

    def make(self, size, tokens, width, pooled, guidance):
        g = torch.Generator().manual_seed(0)
        states = torch.randn(1, tokens, width, generator=g)
        extra = {"guidance": guidance}
        if pooled:
            extra["pooled_output"] = torch.randn(1, pooled, generator=g)
        image = torch.rand(1, size, size, 3, generator=g)
        mask = torch.zeros(1, size, size)
        mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
        negative = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        return [[states, extra]], [[torch.zeros_like(states), negative]], image, mask


class EditKitBenchSink:
    """Output node taking a LATENT, so a prompt has an output and nothing more."""

    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True
    CATEGORY = "EditKit/benchmark"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",)}}

    def take(self, latent):
        return {"ui": {"shape": list(latent["samples"].shape)}}


NODES = {"EditKitBenchInputs": EditKitBenchInputs, "EditKitBenchSink": EditKitBenchSink}
