"""Loading Z-Image-Turbo offline: the transformer, its schedule and the FLUX.1 VAE.

Sources (the ones ComfyUI users have):

* the diffusers folder ``models/diffusers/Z-Image-Turbo`` (every component, tokenizer included);
* ComfyUI's single file ``z_image_turbo_bf16.safetensors`` in ``models/diffusion_models``: the
  original key layout (fused ``attention.qkv``, ``x_embedder``, ``final_layer``), with or without
  ComfyUI's ``model.diffusion_model.`` prefix; diffusers-layout single files load too;
* GGUF files of the same layout (weights stay quantized and are dequantized layer by layer);
* the FLUX.1 VAE ``ae.safetensors`` (Z-Image uses FLUX.1's VAE and latent format), through the
  FLUX.1 loader's code.

The original → diffusers key conversion is diffusers' own (``from_single_file`` runs it when the
keys differ). Sizes that tensor shapes reveal are read from the file; the rest comes from the
config shipped in ``configs/zimage_transformer``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core import loading as core_loading
from ..core.family import ComponentSpec
from ..core.single_file import SingleFile, check_rotary

log = logging.getLogger("EditKit")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TRANSFORMER_CONFIG_DIR = CONFIG_DIR / "zimage_transformer"
SCHEDULER_CONFIG = CONFIG_DIR / "zimage_scheduler" / "scheduler_config.json"
COMFY_PREFIX = "model.diffusion_model."
PATCH = 2  # latent pixels per token side (all_patch_size)

TRANSFORMER_EXPECTED = (
    "a Z-Image transformer (z_image_turbo_bf16.safetensors as ComfyUI distributes it, keys like "
    "'layers.0.attention.qkv.weight'; a diffusers-layout file; or a .gguf of either)"
)


_load_json = core_loading.read_json


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """Shape of the weight a tensor stands for (GGUF tensors store packed bytes)."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def transformer_layout(sd: dict[str, torch.Tensor]) -> str | None:
    """``"original"`` (Tongyi's / ComfyUI's keys), ``"diffusers"``, ``"flux"`` or ``None``."""
    if "all_x_embedder.2-1.weight" in sd and "cap_embedder.1.weight" in sd:
        return "diffusers"
    if "x_embedder.weight" in sd and "cap_embedder.1.weight" in sd and "layers.0.adaLN_modulation.0.weight" in sd:
        return "original"
    if any(k.startswith(("double_blocks.", "transformer_blocks.")) for k in sd):
        return "flux"
    return None


def transformer_config_from_state_dict(sd: dict[str, torch.Tensor], layout: str) -> dict:
    """ZImageTransformer2DModel settings that a state dict of either layout determines."""
    x_key = "all_x_embedder.2-1.weight" if layout == "diffusers" else "x_embedder.weight"
    q_norm = "layers.0.attention.norm_q.weight" if layout == "diffusers" else "layers.0.attention.q_norm.weight"
    dim, features = _shape(sd[x_key])
    head_dim = _shape(sd[q_norm])[0]
    if layout == "diffusers":
        kv_rows = _shape(sd["layers.0.attention.to_k.weight"])[0]
    else:
        kv_rows = (_shape(sd["layers.0.attention.qkv.weight"])[0] - dim) // 2
    check_rotary(TRANSFORMER_CONFIG_DIR, "axes_dims", head_dim, "Z-Image transformer")
    return {
        "dim": dim,
        "in_channels": features // (PATCH * PATCH),
        "n_layers": core_loading.count_blocks(sd, "layers."),
        "n_refiner_layers": core_loading.count_blocks(sd, "noise_refiner."),
        "n_heads": dim // head_dim,
        "n_kv_heads": kv_rows // head_dim,
        "cap_feat_dim": _shape(sd["cap_embedder.1.weight"])[1],
    }


def _to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys → diffusers' by diffusers' own converter (the one ``from_single_file`` runs): it splits
    the fused ``qkv`` and renames the embedders."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return convert_z_image_transformer_checkpoint_to_diffusers(sd)


def _config_from(sd: dict[str, torch.Tensor]) -> dict:
    return transformer_config_from_state_dict(sd, "diffusers")


# fp8 weights stay fp8 except the timestep embedder's: diffusers casts the timestep features to its first weight's
# dtype, so fp8 there would round them to fp8.
SINGLE_FILE = SingleFile(
    model_class="ZImageTransformer2DModel", config_dir=TRANSFORMER_CONFIG_DIR, name="Z-Image transformer",
    expected=TRANSFORMER_EXPECTED, layout=transformer_layout, prefixes=(COMFY_PREFIX,),
    foreign=(("flux", "This is a FLUX.1 transformer, not Z-Image (load it with EditKit · Flux Loader)"),),
    config_from=_config_from, to_diffusers=_to_diffusers,
    widen=("t_embedder.",),
)


TRANSFORMER = ComponentSpec(
    tag="zimage_transformer", what="Z-Image transformer", subfolder="transformer",
    model_class="ZImageTransformer2DModel", kind="diffusion",
    single_file=SINGLE_FILE, casts=True,
    missing="No transformer: pick a diffusers folder or a transformer file (z_image_turbo_bf16.safetensors) in "
            "EditKit · Z-Image Loader.",
)
transformer_source = TRANSFORMER.source


class ZImageModel:
    """What EditKit's Z-Image loader hands to samplers: a lazily loaded transformer and its schedule.

    LoRA nodes return a copy whose ``transformer`` also applies their LoRAs while a sampler runs
    (:func:`..core.lora.add_lora`); the shared base model is never changed.
    """

    def __init__(self, transformer, scheduler_config: dict):
        self.transformer = transformer
        self.scheduler_config = scheduler_config

    def __repr__(self) -> str:
        return f"<EditKit ZImageModel {self.transformer!r}>"
