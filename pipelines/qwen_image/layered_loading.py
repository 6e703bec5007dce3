"""Loading Qwen-Image-Layered offline: the diffusers folder or ComfyUI's single files.

Qwen-Image-Layered is Qwen-Image's transformer with two switches on (a learned "RGB or RGBA"
timestep embedding, ``use_additional_t_cond``, and a RoPE whose frame axis numbers the layers,
``use_layer3d_rope``), an RGBA VAE (Qwen-Image's VAE with 4 input/output channels) and the same
Qwen2.5-VL-7B text encoder, whose language-model head also writes a caption when no prompt is given.
Why a loader of its own: the Qwen-Image(-Edit) loaders (:mod:`.loading`) build the transformer and
the VAE from Qwen-Image's configs, which would drop the Layered weights and the alpha channel. The
text encoder itself is the family's (:mod:`.text`), shared through the weak model cache; this
module adds only its language-model head.

Sources:

* the diffusers folder ``models/diffusers/Qwen-Image-Layered`` (every component);
* the transformer from ``models/diffusion_models``: ComfyUI's ``qwen_image_layered_bf16.safetensors``,
  ``qwen_image_layered_fp8mixed.safetensors`` (ComfyUI's mixed-precision layout: some weights fp8 with a
  per-tensor ``weight_scale``), or a ``.gguf`` (weights stay quantized);
* the RGBA VAE ``qwen_image_layered_vae.safetensors`` from ``models/vae`` (Wan-VAE key layout);
* the text encoder ``qwen_2.5_vl_7b*.safetensors`` from ``models/text_encoders`` (captioning needs a file
  that keeps ``lm_head.weight``; otherwise write a prompt).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from ..core.errors import EditKitError, ModelFileError
from ..core.family import ComponentSpec
from ..core.loading import LazyModel, cast_stored_weights, file_key, folder_key, unavailable
from ..core.runtime import Component
from ..core.single_file import SingleFile
from .loading import (
    CONFIG_DIR,
    _describe_foreign,
    _load_json,
    check_latent,
    strip_comfy_prefix,
    transformer_config_from_state_dict,
)
from .loading import VAE_FILE as EDIT_VAE_FILE

log = logging.getLogger("EditKit")

LAYERED_SWITCHES = {"use_additional_t_cond": True, "use_layer3d_rope": True}
RGBA_CHANNELS = 4
TRANSFORMER_EXPECTED = (
    "the Qwen-Image-Layered transformer (ComfyUI's qwen_image_layered_bf16.safetensors or "
    "qwen_image_layered_fp8mixed.safetensors, or a .gguf of Qwen-Image-Layered)"
)
VAE_EXPECTED = "the Qwen-Image-Layered RGBA VAE (qwen_image_layered_vae.safetensors: 4 image channels, 16 latent)"
ADDITION_T_KEY = "time_text_embed.addition_t_embedding.weight"
HEAD_KEYS = ("lm_head.weight", "model.lm_head.weight", "language_model.lm_head.weight")

# Qwen2.5-VL-7B-Instruct's published generation settings, used when no folder supplies
# text_encoder/generation_config.json. top_k 1 makes its sampling greedy, so it is run greedily.
GENERATION_DEFAULTS = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                       "repetition_penalty": 1.05, "do_sample": False}


def is_layered(config) -> bool:
    return all(bool(config.get(name, False)) for name in LAYERED_SWITCHES)


def not_layered_message(what: str) -> str:
    return (
        f"{what} is a Qwen-Image / Qwen-Image-Edit transformer, not Qwen-Image-Layered (it has no layer RoPE and "
        "no RGBA timestep embedding). Load qwen_image_layered_bf16.safetensors / qwen_image_layered_fp8mixed."
        "safetensors or the Qwen-Image-Layered diffusers folder in EditKit · Qwen-Image-Layered Loader"
    )


# --------------------------------------------------------------------------------------
# Transformer


def _recognise(sd: dict, path: Path) -> tuple[dict, str]:
    sd = strip_comfy_prefix(sd)
    if "img_in.weight" not in sd or "txt_norm.weight" not in sd:
        raise ModelFileError(path, f"This is {_describe_foreign(sd)}", TRANSFORMER_EXPECTED)
    if ADDITION_T_KEY not in sd:
        raise ModelFileError(path, not_layered_message("This file"), TRANSFORMER_EXPECTED)
    return sd, "diffusers"


# Qwen-Image's transformer with the Layered switches on. The RGB/RGBA embedding is an nn.Embedding: a GGUF
# converter may quantize it and an fp8 file may store it in fp8; the shared reader widens both (only Linear
# layers keep quantized or fp8 weights).
SINGLE_FILE = SingleFile(
    model_class="QwenImageTransformer2DModel", config_dir=CONFIG_DIR / "transformer",
    name="Qwen-Image-Layered transformer", expected=TRANSFORMER_EXPECTED, recognise=_recognise,
    config_from=transformer_config_from_state_dict, options=tuple(LAYERED_SWITCHES.items()),
)


def _refuse_other_transformers(config: dict, sub: Path) -> None:
    if not is_layered(config):
        raise ModelFileError(sub, not_layered_message(f"The folder '{sub.parent.name}'"), TRANSFORMER_EXPECTED)


TRANSFORMER = ComponentSpec(
    tag="qwen_layered_transformer", what="Qwen-Image-Layered transformer", subfolder="transformer",
    model_class="QwenImageTransformer2DModel", kind="diffusion", single_file=SINGLE_FILE, casts=True,
    check_config=_refuse_other_transformers,
    missing="No transformer: pick the Qwen-Image-Layered diffusers folder or a transformer file in EditKit · "
            "Qwen-Image-Layered Loader.",
)
transformer_source = TRANSFORMER.source


def check_transformer(component: Component) -> None:
    """Refuse a transformer that is not Qwen-Image-Layered (e.g. an Edit model loaded some other way)."""
    if not is_layered(component.module.config):
        raise EditKitError(not_layered_message(f"'{component.name}'") + ".")


# --------------------------------------------------------------------------------------
# RGBA VAE


def _check_rgba(channels: int, where: Path) -> None:
    if channels == 3:
        raise ModelFileError(where, "This is Qwen-Image's RGB VAE (3 image channels); Qwen-Image-Layered decodes "
                                    "transparent layers with its own RGBA VAE", VAE_EXPECTED)
    if channels != RGBA_CHANNELS:
        raise ModelFileError(where, f"A VAE with {channels} image channels", VAE_EXPECTED)


def _check_vae_file(config: dict, path: Path) -> None:
    _check_rgba(config["input_channels"], path)
    check_latent(config, path, "Qwen-Image-Layered", VAE_EXPECTED)


# Qwen-Image's VAE declaration (layouts, converter, sizes read from the file) with 4 image channels.
VAE_FILE = dataclasses.replace(
    EDIT_VAE_FILE, name="Qwen-Image-Layered VAE", expected=VAE_EXPECTED, check=_check_vae_file,
    foreign=(("2d", "This is a 2-D image VAE (FLUX.1 / SD style), not Qwen-Image-Layered's"),),
)


VAE = ComponentSpec(
    tag="qwen_layered_vae", what="Qwen-Image-Layered VAE", subfolder="vae", model_class="AutoencoderKLQwenImage",
    kind="vae", single_file=VAE_FILE,
    check_config=lambda config, sub: _check_rgba(int(config.get("input_channels", 3)), sub),
    missing="No VAE: pick the Qwen-Image-Layered diffusers folder or qwen_image_layered_vae.safetensors in "
            "EditKit · Qwen-Image-Layered Loader.",
)
vae_source = VAE.source


def check_vae(component: Component) -> None:
    channels = int(component.module.config.get("input_channels", 3))
    if channels != RGBA_CHANNELS:
        raise EditKitError(
            f"'{component.name}' is a VAE with {channels} image channels; Qwen-Image-Layered needs its RGBA VAE "
            "(qwen_image_layered_vae.safetensors or the Qwen-Image-Layered folder's vae/)."
        )


# --------------------------------------------------------------------------------------
# The text encoder's language-model head (captioning)


def _head_from_folder(sub: Path) -> torch.Tensor | None:
    """``lm_head.weight`` of a transformers text-encoder folder (sharded or not); None when tied or absent."""
    import safetensors

    index = sub / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        name = next((k for k in HEAD_KEYS if k in weight_map), None)
        files = [sub / weight_map[name]] if name else []
    else:
        files = sorted(sub.glob("*.safetensors"))
    for path in files:
        with safetensors.safe_open(str(path), "pt") as handle:
            for key in HEAD_KEYS:
                if key in handle.keys():
                    return handle.get_tensor(key)
    return None


def _head_from_file(path: Path) -> torch.Tensor | None:
    import safetensors

    if path.suffix.lower() not in (".safetensors", ".sft"):
        return None
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            keys = set(handle.keys())
            key = next((k for k in HEAD_KEYS if k in keys), None)
            if key is None:
                return None
            found = {"lm_head.weight": handle.get_tensor(key)}
            scale = key[: -len(".weight")] + ".scale_weight"
            if scale in keys:
                found["lm_head.scale_weight"] = handle.get_tensor(scale)
    except Exception as exc:  # the text encoder's own load reports unreadable files
        log.debug("EditKit: no lm_head read from %s (%s)", path.name, exc)
        return None
    return cast_stored_weights(found, torch.float32)["lm_head.weight"]


def _tied(folder: Path | None) -> bool:
    if folder is None or not (folder / "text_encoder" / "config.json").is_file():
        return False
    config = _load_json(folder / "text_encoder" / "config.json")
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


class CaptionHead:
    """The language-model head of Qwen2.5-VL plus the generation settings captions are written with.

    ``weight`` None means "tied to the input embedding" (read from the loaded encoder when used).
    """

    def __init__(self, weight: torch.Tensor | None, generation: dict, name: str):
        self.weight = weight
        self.generation = generation
        self.name = name


def _generation_settings(folder: Path | None) -> dict:
    """The folder's text_encoder/generation_config.json when there is one, else Qwen2.5-VL-7B-Instruct's."""
    path = None if folder is None else folder / "text_encoder" / "generation_config.json"
    settings = dict(GENERATION_DEFAULTS)
    if path is not None and path.is_file():
        found = _load_json(path)
        settings = {k: found[k] for k in ("bos_token_id", "pad_token_id", "eos_token_id", "repetition_penalty",
                                          "do_sample", "top_k", "top_p", "temperature") if k in found}
    if settings.get("top_k") == 1:  # sampling from one candidate is greedy decoding, without touching any RNG
        settings["do_sample"] = False
    if not settings.get("do_sample"):
        for key in ("top_k", "top_p", "temperature"):
            settings.pop(key, None)
    return settings


def _caption_head(folder: Path | None, file: Path | None) -> CaptionHead:
    generation = _generation_settings(folder)
    if file is not None:
        weight = _head_from_file(file)
        if weight is None:
            raise EditKitError(
                f"'{file.name}' has no language-model head (lm_head.weight), so Qwen-Image-Layered cannot caption the "
                "picture with it. Write a prompt describing the picture, or load the text encoder from the "
                "Qwen-Image-Layered diffusers folder (text_encoder_file: (from folder))."
            )
        return CaptionHead(weight, generation, file.name)
    if _tied(folder):
        return CaptionHead(None, generation, f"{folder.name}/text_encoder (tied)")
    weight = _head_from_folder(folder / "text_encoder")
    if weight is None:
        raise EditKitError(
            f"The text encoder in '{folder / 'text_encoder'}' has no language-model head (lm_head.weight), so it cannot "
            "caption the picture. Write a prompt describing the picture, or re-download the folder."
        )
    return CaptionHead(weight, generation, f"{folder.name}/text_encoder")


def caption_head_source(folder: Path | None, file: Path | None) -> LazyModel:
    """The head of the text encoder the loader picked (``file`` if given, else the folder's)."""
    if folder is None and file is None:
        return unavailable("Qwen2.5-VL head", "No text encoder: pick the Qwen-Image-Layered diffusers folder or "
                           "qwen_2.5_vl_7b*.safetensors in EditKit · Qwen-Image-Layered Loader.")
    source = file_key(file) if file is not None else folder_key(folder, "text_encoder")
    return LazyModel(("qwen_caption_head", source, str(folder)), lambda: _caption_head(folder, file),
                     "Qwen2.5-VL language-model head")


# --------------------------------------------------------------------------------------
# Handles the loader node returns


class LayeredModel:
    """What the Layered loader hands to the decomposition node: the lazy transformer and its schedule."""

    def __init__(self, transformer: LazyModel, scheduler_config: dict):
        self.transformer = transformer
        self.scheduler_config = scheduler_config

    def __repr__(self) -> str:
        return f"<EditKit Qwen-Image-Layered {self.transformer!r}>"


class CaptioningTextEncoder:
    """The family's Qwen2.5-VL handle plus the head that writes captions.

    ``get()`` returns the family's encoder object, so this handle also feeds EditKit · Qwen-Image Edit;
    text-encoder handles without a head (from the Qwen-Image Loader) work for the decomposition when a
    prompt is written.
    """

    def __init__(self, encoder: LazyModel, head: LazyModel):
        self.encoder = encoder
        self.head = head

    def get(self):
        return self.encoder.get()

    def caption_head(self) -> CaptionHead:
        return self.head.get()

    def __repr__(self) -> str:
        return f"<EditKit captioning {self.encoder!r}>"
