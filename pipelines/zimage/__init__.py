"""Z-Image-Turbo: loading (diffusers folder, ComfyUI single files, GGUF), the sampler on the shared core, the
progressive recipe (low resolution first, then latent upscale + img2img), LoRA, and the standalone API and CLI.

The standalone API is :class:`ZImageProgressive` (``from pipelines.zimage import ZImageProgressive`` from the
repository root); the CLI is ``python -m pipelines zimage``.
"""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy, so importing the package (e.g. for the CLI's --help) does not import torch-heavy modules.
    if name == "ZImageProgressive":
        from .api import ZImageProgressive

        return ZImageProgressive
    raise AttributeError(name)


__all__ = ["ZImageProgressive"]
