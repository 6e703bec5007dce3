"""Loading the FLUX.1 Redux prior: SigLIP vision encoder + Redux embedder + SigLIP image processor.

Two sources, as users have them:

* the diffusers folder ``models/diffusers/FLUX.1-Redux-dev`` (``image_encoder/``: SiglipVisionModel,
  ``image_embedder/``: ReduxImageEncoder, ``feature_extractor/``: the SigLIP image processor), loaded
  with transformers' and diffusers' own ``from_pretrained``;
* ComfyUI's single files ``models/style_models/flux1-redux-dev.safetensors`` (the embedder) and
  ``models/clip_vision/sigclip_vision_patch14_384.safetensors`` (SigLIP so400m-patch14-384), loaded
  with the configs in ``configs/``; widths, layer counts, patch size and token grid are read from
  the files, so only facts a file cannot tell (SigLIP's head width) come from the shipped config.

A chosen file replaces the folder's component. Files of other kinds that live in the same
ComfyUI folders (CLIP-H/ViT-L vision towers, DINOv2, SigLIP 512, the SD1.5 style adapter) are
rejected with a message naming what they are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...core.errors import EditKitError, ModelFileError
from ...core.loading import LazyModel, cast_stored_weights, file_key, folder_key, read_state_dict
from ...core.runtime import Component

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SIGLIP_CONFIG_DIR = CONFIG_DIR / "siglip_so400m_patch14_384"
EMBEDDER_CONFIG_DIR = CONFIG_DIR / "flux_redux_embedder"

SIGLIP_EXPECTED = (
    "SigLIP so400m-patch14-384's vision encoder (sigclip_vision_patch14_384.safetensors from "
    "Comfy-Org/sigclip_vision_384, in models/clip_vision)"
)
EMBEDDER_EXPECTED = (
    "the FLUX.1 Redux embedder (flux1-redux-dev.safetensors from black-forest-labs/FLUX.1-Redux-dev, in "
    "models/style_models; tensors redux_up.* and redux_down.*)"
)
FOLDER_EXPECTED = (
    "a FLUX.1-Redux-dev diffusers folder (image_encoder/, image_embedder/, feature_extractor/ and model_index.json)"
)
SO400M_WIDTH = 1152  # SigLIP so400m: the only width FLUX.1-Redux-dev was trained on
SO400M_PATCH = 14
SO400M_GRID = 27  # 384 px / 14 px patches


def _load_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _image_processor_class():
    """SigLIP's PIL image processor (no torchvision): transformers 5 names it ``SiglipImageProcessorPil``.

    The torchvision flavour resizes with other kernels, so its numbers differ from the reference
    pipeline's; transformers 4.x's ``SiglipImageProcessor`` is the PIL one.
    """
    try:
        from transformers import SiglipImageProcessorPil

        return SiglipImageProcessorPil
    except ImportError:  # transformers 4.x
        from transformers import SiglipImageProcessor

        return SiglipImageProcessor


@dataclass(eq=False)
class ReduxPrior:
    """A loaded prior: both models as host-managed components, plus the SigLIP image processor."""

    encoder: Component  # transformers SiglipVisionModel
    embedder: Component  # diffusers ReduxImageEncoder
    processor: object  # SigLIP image processor (PIL flavour)

    @property
    def image_size(self) -> int:
        return int(self.encoder.module.config.image_size)

    @property
    def grid(self) -> int:
        """Tokens per side of SigLIP's patch grid (27 for so400m-patch14-384)."""
        config = self.encoder.module.config
        return config.image_size // config.patch_size

    @property
    def token_width(self) -> int:
        """Width of the embedder's output tokens: FLUX.1's T5 width (4096)."""
        return int(self.embedder.module.config.txt_in_features)


def _check_pair(encoder_width: int, embedder_in: int, where: Path) -> None:
    if encoder_width != embedder_in:
        raise ModelFileError(
            where,
            f"The SigLIP encoder outputs {encoder_width}-wide tokens but the Redux embedder reads {embedder_in}",
            "a SigLIP encoder and Redux embedder that belong together (so400m-patch14-384: 1152)",
        )


# --------------------------------------------------------------------------------------
# SigLIP


VISION_PREFIX = "vision_model."  # ComfyUI's and transformers 4.x's key prefix (transformers 5 has none)


def canonical_siglip_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SigLIP tensors keyed without the ``vision_model.`` prefix (how transformers 5 names them)."""
    return {k[len(VISION_PREFIX):] if k.startswith(VISION_PREFIX) else k: v for k, v in sd.items()}


def siglip_config_from_state_dict(sd: dict[str, torch.Tensor], path: Path) -> dict:
    """SiglipVisionConfig settings that a SigLIP state dict (canonical keys) determines."""
    keys = set(sd)
    kind = _foreign_vision_kind(keys)
    if kind is not None:
        raise ModelFileError(path, f"This is {kind}, not SigLIP", SIGLIP_EXPECTED)
    needed = ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
              "post_layernorm.weight", "encoder.layers.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in keys]
    if missing:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise ModelFileError(path, f"Not a SigLIP vision encoder (no {missing[0]}; found keys like {sample})",
                             SIGLIP_EXPECTED)
    width, channels, patch, _ = sd["embeddings.patch_embedding.weight"].shape
    positions = sd["embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions)
    if grid * grid != positions or channels != 3:
        raise ModelFileError(path, f"A vision encoder with {positions} positions and {channels} input channels "
                                   "(SigLIP has a square patch grid over RGB)", SIGLIP_EXPECTED)
    if width == SO400M_WIDTH and (patch != SO400M_PATCH or grid != SO400M_GRID):
        raise ModelFileError(
            path, f"This is SigLIP so400m-patch{patch}-{grid * patch} ({grid}x{grid} tokens); FLUX.1 Redux was "
                  f"trained on so400m-patch14-384 ({SO400M_GRID}x{SO400M_GRID} tokens)", SIGLIP_EXPECTED)
    base = _load_json(SIGLIP_CONFIG_DIR / "config.json")
    head_dim = base["hidden_size"] // base["num_attention_heads"]
    if width % head_dim:
        raise ModelFileError(path, f"A SigLIP {width} wide, which is not a multiple of so400m's head width "
                                   f"{head_dim}", SIGLIP_EXPECTED)
    layers = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("encoder.layers."))
    return {
        **{k: v for k, v in base.items() if k != "architectures"},
        "hidden_size": int(width),
        "intermediate_size": int(sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": int(width // head_dim),
        "patch_size": int(patch),
        "image_size": int(grid * patch),
        "vision_use_head": any(k.startswith("head.") for k in keys),
    }


def _foreign_vision_kind(keys: set[str]) -> str | None:
    """Name the other vision encoders people keep in models/clip_vision."""
    if any(k.startswith("visual.") for k in keys) or "embeddings.class_embedding" in keys \
            or "pre_layrnorm.weight" in keys:
        return "a CLIP vision encoder (e.g. clip_vision_h / ViT-L, as used by IP-Adapter or unCLIP)"
    if any(".layer_scale" in k for k in keys) or "embeddings.cls_token" in keys:
        return "a DINOv2 image encoder"
    if "redux_up.weight" in keys:
        return "the FLUX.1 Redux embedder (it belongs in models/style_models)"
    return None


def _siglip_from_file(path: Path, dtype: torch.dtype) -> Component:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    sd = canonical_siglip_keys(read_state_dict(path, SIGLIP_EXPECTED))
    config = SiglipVisionConfig(**siglip_config_from_state_dict(sd, path))
    cast_stored_weights(sd, dtype)
    with torch.device("meta"):
        model = SiglipVisionModel(config)
    if any(k.startswith(VISION_PREFIX) for k in model.state_dict()):
        sd = {VISION_PREFIX + k: v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelFileError(path, f"Weights do not fit SigLIP ({exc})", SIGLIP_EXPECTED) from exc
    embeddings = getattr(model, "vision_model", model).embeddings
    if getattr(embeddings, "position_ids", None) is not None and embeddings.position_ids.is_meta:
        # transformers 4.x keeps a non-persistent position-id buffer, which no file holds
        embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions)[None], persistent=False)
    model.to(dtype).eval().requires_grad_(False)
    return Component(model, "text_encoder", path.name, dtype)


def _siglip_from_folder(folder: Path, dtype: torch.dtype) -> Component:
    from transformers import SiglipVisionModel

    sub = folder / "image_encoder"
    if not (sub / "config.json").is_file():
        raise ModelFileError(sub, "No image_encoder in this diffusers folder", FOLDER_EXPECTED)
    try:
        model = SiglipVisionModel.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(sub, f"Cannot load the SigLIP image encoder ({exc})", FOLDER_EXPECTED) from exc
    model.eval().requires_grad_(False)
    return Component(model, "text_encoder", f"{folder.name}/image_encoder", dtype)


# --------------------------------------------------------------------------------------
# Redux embedder


def _embedder_from_file(path: Path, dtype: torch.dtype) -> Component:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    sd = read_state_dict(path, EMBEDDER_EXPECTED)
    keys = set(sd)
    if "style_embedding" in keys:
        raise ModelFileError(path, "This is a T2I-Adapter style model (Stable Diffusion 1.x), not FLUX.1 Redux",
                             EMBEDDER_EXPECTED)
    expected = {"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}
    if keys != expected:
        sample = ", ".join(sorted(keys - expected)[:3] or sorted(keys)[:3]) or "no tensors"
        raise ModelFileError(path, f"Not a FLUX.1 Redux style model (found keys like {sample})", EMBEDDER_EXPECTED)
    hidden, redux_dim = sd["redux_up.weight"].shape
    out_width, down_in = sd["redux_down.weight"].shape
    if down_in != hidden or hidden != 3 * out_width:
        raise ModelFileError(path, f"Redux layers of shapes {tuple(sd['redux_up.weight'].shape)} and "
                                   f"{tuple(sd['redux_down.weight'].shape)} do not chain", EMBEDDER_EXPECTED)
    cast_stored_weights(sd, dtype)
    base = _load_json(EMBEDDER_CONFIG_DIR / "config.json")
    with torch.device("meta"):
        model = ReduxImageEncoder(**{**{k: v for k, v in base.items() if not k.startswith("_")},
                                     "redux_dim": int(redux_dim), "txt_in_features": int(out_width)})
    model.load_state_dict(sd, strict=True, assign=True)
    model.to(dtype).eval().requires_grad_(False)
    return Component(model, "text_encoder", path.name, dtype)


def _embedder_from_folder(folder: Path, dtype: torch.dtype) -> Component:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    sub = folder / "image_embedder"
    if not (sub / "config.json").is_file():
        raise ModelFileError(sub, "No image_embedder in this diffusers folder", FOLDER_EXPECTED)
    try:
        model = ReduxImageEncoder.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(sub, f"Cannot load the Redux embedder ({exc})", FOLDER_EXPECTED) from exc
    model.eval().requires_grad_(False)
    return Component(model, "text_encoder", f"{folder.name}/image_embedder", dtype)


# --------------------------------------------------------------------------------------
# The prior


def _processor(folder: Path | None, image_size: int):
    """The folder's SigLIP image processor, or so400m's (shipped) resized to the encoder's input size."""
    cls = _image_processor_class()
    if folder is not None and (folder / "feature_extractor" / "preprocessor_config.json").is_file():
        processor = cls.from_pretrained(str(folder / "feature_extractor"), local_files_only=True)
    else:
        settings = _load_json(SIGLIP_CONFIG_DIR / "preprocessor_config.json")
        settings.pop("image_processor_type", None)
        processor = cls(**settings)
    if processor.size.get("height") != image_size or processor.size.get("width") != image_size:
        processor.size = {"height": image_size, "width": image_size}
    return processor


def check_folder(folder: Path) -> None:
    """Fail early when a diffusers folder chosen as the Redux prior is something else."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelFileError(folder, "No model_index.json in this folder", FOLDER_EXPECTED)
    components = _load_json(index)
    if "image_embedder" not in components and not (folder / "image_embedder").is_dir():
        name = components.get("_class_name", "another pipeline")
        raise ModelFileError(folder, f"This diffusers folder holds {name}, not the Redux prior", FOLDER_EXPECTED)


def load_prior(folder: Path | None, siglip_file: Path | None, embedder_file: Path | None,
               dtype: torch.dtype) -> ReduxPrior:
    if folder is not None and (siglip_file is None or embedder_file is None):
        check_folder(folder)
    encoder = _siglip_from_file(siglip_file, dtype) if siglip_file else _siglip_from_folder(folder, dtype)
    embedder = _embedder_from_file(embedder_file, dtype) if embedder_file else _embedder_from_folder(folder, dtype)
    _check_pair(int(encoder.module.config.hidden_size), int(embedder.module.config.redux_dim),
                siglip_file or embedder_file or folder)
    return ReduxPrior(encoder, embedder, _processor(folder, int(encoder.module.config.image_size)))


class ReduxModel:
    """What EditKit · Redux Loader hands on: a lazily loaded prior (nothing is read until it is used)."""

    def __init__(self, folder: Path | None, siglip_file: Path | None, embedder_file: Path | None,
                 dtype: torch.dtype):
        if folder is None and (siglip_file is None or embedder_file is None):
            raise EditKitError(
                "EditKit · Redux Loader needs the FLUX.1-Redux-dev diffusers folder, or both single files: "
                "flux1-redux-dev.safetensors (models/style_models) and sigclip_vision_patch14_384.safetensors "
                "(models/clip_vision)."
            )
        key = ("flux_redux", folder_key(folder),
               file_key(siglip_file), file_key(embedder_file), dtype)
        name = " + ".join(p.name for p in (folder, siglip_file, embedder_file) if p is not None)
        self.prior = LazyModel(key, lambda: load_prior(folder, siglip_file, embedder_file, dtype),
                               f"FLUX.1 Redux prior {name}")

    def __repr__(self) -> str:
        return f"<EditKit ReduxModel {self.prior!r}>"
