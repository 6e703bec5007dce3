"""The standalone Python API: Z-Image-Turbo progressive generation without ComfyUI.

```python
from pipelines.zimage import ZImageProgressive

pipe = ZImageProgressive.from_models_dir("ComfyUI/models")          # or any folder laid out like it
image = pipe.generate("portrait of a sailor, golden hour", seed=7)   # the default three-stage recipe
image = pipe.generate("...", seed=7, stages=open("stages.yaml").read(), lora="loras/me.safetensors",
                      lora_strength=0.8)
```

The same functions run inside EditKit's ComfyUI nodes (:mod:`.progressive`); only the host differs
(a plain-torch :class:`~..core.runtime.TorchRuntime` here). Models load once, on the first call, and
stay loaded; prompt encodings are cached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import EditKitError
from ..core.lora import LoraModelSource, load_lora
from ..core.runtime import Runtime, TorchRuntime, default_device
from .family import FAMILY
from .loading import ZImageModel, transformer_source
from .lora import ZIMAGE_LORA
from .progressive import ProgressiveResult, run_progressive
from .recipe import DEFAULT_STAGES_YAML, parse_recipe
from .text import text_encoder_source

DEFAULT_FOLDER = "Z-Image-Turbo"
DEFAULT_TRANSFORMER = "z_image_turbo_bf16.safetensors"
DEFAULT_TEXT_ENCODER = "qwen_3_4b.safetensors"
DEFAULT_VAE = "ae.safetensors"
_FOLDERS = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip"),
            "vae": ("vae",), "loras": ("loras",)}


def _find(models_dir: Path, folder: str, name: str | None, default: str) -> Path | None:
    """``name`` (or the default file name) in a ComfyUI-style models folder; None if absent and not asked for."""
    wanted = name or default
    candidate = Path(wanted)
    if candidate.is_absolute():
        if not candidate.is_file():
            raise EditKitError(f"Model file not found: '{candidate}'.")
        return candidate
    for sub in _FOLDERS[folder]:
        path = models_dir / sub / wanted
        if path.is_file():
            return path
    if name is not None:
        raise EditKitError(f"Model file '{name}' not found in {models_dir}/{_FOLDERS[folder][0]}. Put it there or "
                           "give an absolute path.")
    return None


def _comfy_tokenizer(models_dir: Path, tokenizer_dir: str | os.PathLike | None) -> Path | None:
    """Qwen tokenizer files: given, or ComfyUI's bundled ones when ``models_dir`` is ComfyUI's models folder."""
    if tokenizer_dir is not None:
        return Path(tokenizer_dir)
    roots = [models_dir.resolve().parent]
    if os.environ.get("COMFYUI_ROOT"):
        roots.append(Path(os.environ["COMFYUI_ROOT"]))
    for root in roots:
        path = root / "comfy" / "text_encoders" / "qwen25_tokenizer"
        if path.is_dir():
            return path
    return None


@dataclass
class ZImageParts:
    """The loaded-on-demand pieces one generation needs (the same handles the ComfyUI loader returns)."""

    model: ZImageModel
    text_encoder: object  # LazyModel of ZImageTextEncoder
    vae: object  # LazyModel of the FLUX.1 VAE Component


def encode_prompts(text_encoder, prompt: str, negative_prompt: str | None, runtime: Runtime):
    """Caption lists for the positive and (when given) negative prompt, each encoded once and cached."""
    encoder = text_encoder.get()
    captions = [encoder.encode(prompt, runtime)]
    negative = None if negative_prompt is None else [encoder.encode(negative_prompt, runtime)]
    return captions, negative


class ZImageProgressive:
    """Z-Image-Turbo progressive generation as a Python object (see the module docstring)."""

    def __init__(self, parts: ZImageParts, runtime: Runtime | None = None):
        self.parts = parts
        self.runtime = runtime or TorchRuntime()
        self._models_dir: Path | None = None

    @classmethod
    def from_models_dir(
        cls,
        models_dir: str | os.PathLike,
        *,
        diffusers_folder: str | None = None,
        transformer: str | None = None,
        text_encoder: str | None = None,
        vae: str | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        runtime: Runtime | None = None,
    ) -> ZImageProgressive:
        """Find the models in a ComfyUI-style ``models`` folder (nothing is read until the first generation).

        Single files with ComfyUI's names (``diffusion_models/z_image_turbo_bf16.safetensors``,
        ``text_encoders/qwen_3_4b.safetensors``, ``vae/ae.safetensors``) are used where present; the
        diffusers folder ``diffusers/Z-Image-Turbo`` supplies the rest (and the tokenizer). Without
        that folder the tokenizer comes from ``tokenizer_dir`` or, when ``models_dir`` is ComfyUI's
        own, from ComfyUI's bundled Qwen tokenizer files.
        """
        models_dir = Path(models_dir)
        if not models_dir.is_dir():
            raise EditKitError(f"Models folder not found: '{models_dir}'. Give ComfyUI's models folder or one laid "
                               "out like it (diffusion_models/, text_encoders/, vae/, diffusers/).")
        folder = models_dir / "diffusers" / (diffusers_folder or DEFAULT_FOLDER)
        if not (folder / "model_index.json").is_file():
            if diffusers_folder is not None:
                raise EditKitError(f"No diffusers folder '{folder}' (it needs a model_index.json).")
            folder = None
        files = {
            "transformer": _find(models_dir, "diffusion_models", transformer, DEFAULT_TRANSFORMER),
            "text encoder": _find(models_dir, "text_encoders", text_encoder, DEFAULT_TEXT_ENCODER),
            "VAE": _find(models_dir, "vae", vae, DEFAULT_VAE),
        }
        if folder is None:
            missing = [what for what, path in files.items() if path is None]
            if missing:
                raise EditKitError(
                    f"No {', '.join(missing)} in '{models_dir}': put {DEFAULT_TRANSFORMER} in diffusion_models/, "
                    f"{DEFAULT_TEXT_ENCODER} in text_encoders/ and {DEFAULT_VAE} in vae/ (ComfyUI's single files), "
                    f"or the whole diffusers folder in diffusers/{DEFAULT_FOLDER}/."
                )
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        vae_dtype = torch.float32 if dtype != torch.bfloat16 else dtype
        parts = ZImageParts(
            model=ZImageModel(transformer_source(folder, files["transformer"], dtype), FAMILY.scheduler_config(folder)),
            text_encoder=text_encoder_source(folder, files["text encoder"], dtype,
                                             _comfy_tokenizer(models_dir, tokenizer_dir)),
            vae=FAMILY.vae.source(folder, files["VAE"], vae_dtype),
        )
        pipe = cls(parts, runtime or TorchRuntime(device))
        pipe._models_dir = models_dir
        return pipe

    def _model(self, lora, lora_strength: float):
        source = self.parts.model.transformer
        loras = [lora] if isinstance(lora, (str, os.PathLike)) else list(lora or [])
        strengths = lora_strength if isinstance(lora_strength, (list, tuple)) else [lora_strength] * len(loras)
        for path, strength in zip(loras, strengths, strict=True):
            path = Path(path)
            if not path.is_absolute() and not path.is_file() and self._models_dir is not None:
                path = self._models_dir / "loras" / path
            source = LoraModelSource.chain(source, load_lora(path, ZIMAGE_LORA), float(strength))
        return source

    def run(self, prompt: str, *, seed: int = 0, stages=None, negative_prompt: str | None = "", lora=None,
            lora_strength=1.0, upscale_method: str = "nearest-exact", batch_size: int = 1,
            decode_stages: bool = False, progress=None) -> ProgressiveResult:
        """Every stage's latents, the final picture and per-stage timings (tensors)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise EditKitError("The prompt is empty. Describe the picture to generate.")
        recipe = parse_recipe(DEFAULT_STAGES_YAML if stages is None else stages)  # validated before any loading
        source = self._model(lora, lora_strength)
        captions, negative = encode_prompts(self.parts.text_encoder, prompt, negative_prompt, self.runtime)
        return run_progressive(
            source.get(), self.parts.vae.get(), self.parts.model.scheduler_config, captions, negative, recipe,
            seed, self.runtime, batch_size=batch_size, upscale_method=upscale_method, decode_stages=decode_stages,
            progress=progress,
        )

    def generate(self, prompt: str, *, seed: int = 0, stages=None, negative_prompt: str | None = "", lora=None,
                 lora_strength=1.0, upscale_method: str = "nearest-exact"):
        """The final picture as a PIL image.

        ``stages``: YAML text (see :mod:`.recipe`), a mapping or ``None`` for the default recipe;
        ``lora``: a LoRA file (or a list of files) with ``lora_strength`` (or a list of strengths).
        """
        result = self.run(prompt, seed=seed, stages=stages, negative_prompt=negative_prompt, lora=lora,
                          lora_strength=lora_strength, upscale_method=upscale_method)
        return to_pil(result.image[0])


def to_pil(picture: torch.Tensor):
    """``[3,H,W]`` in 0..1 → 8-bit PIL RGB, rounded as ComfyUI's SaveImage does (clip(255 x))."""
    import numpy as np
    from PIL import Image

    array = np.clip(255.0 * picture.movedim(0, -1).float().cpu().numpy(), 0, 255).astype(np.uint8)
    return Image.fromarray(array)
