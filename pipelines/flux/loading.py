"""Loading FLUX.1 components offline, from a diffusers folder or from single files.

Supported sources (the ones ComfyUI users have):

* a full diffusers folder (``models/diffusers/FLUX.1-Fill-dev``): every component;
* the transformer from one file: BFL-layout ``.safetensors`` (with or without ComfyUI's
  ``model.diffusion_model.`` prefix), diffusers-layout ``.safetensors``, or ``.gguf`` (every
  quantization diffusers reads; the file is mapped, not copied, the weights stay quantized in
  memory and are dequantized layer by layer by EditKit's GGUF layers, see ``core.gguf``);
* the VAE from BFL's ``ae.safetensors`` (or a diffusers-layout file);
* CLIP-L and T5-XXL from single files (fp32/fp16/bf16, fp8 and ComfyUI's "scaled fp8"
  storage), with tokenizers from the diffusers folder or from ComfyUI's bundled tokenizer
  files.

Single files are loaded with configs shipped in ``pipelines/flux/configs``; sizes that tensor
shapes reveal (layer counts, widths, input features) are read from the file, so FLUX.1-dev,
Fill-dev, EditKit's 192-feature Kontext-inpaint and the tiny test models load through the same
code. Loaded models are shared: loading the same file twice (same size, mtime and dtype)
returns the model already in memory for as long as anything still uses it; the cache holds
weak references only, so ComfyUI's "free memory" really frees.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core import loading as core_loading
from ..core.errors import ModelFileError
from ..core.family import ComponentSpec
from ..core.loading import LazyModel
from ..core.single_file import SingleFile, check_rotary
from . import layout as flux_layout

log = logging.getLogger("EditKit")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TRANSFORMER_CONFIG_DIR = CONFIG_DIR / "flux_fill_transformer"
VAE_CONFIG_DIR = CONFIG_DIR / "flux_vae"

TRANSFORMER_EXPECTED = (
    "a FLUX.1 transformer (.safetensors in BFL layout, keys like 'double_blocks.0.img_attn.qkv.weight', "
    "as flux1-fill-dev.safetensors; or diffusers layout; or a .gguf such as flux1-fill-dev-Q8_0.gguf)"
)
VAE_EXPECTED = "the FLUX.1 VAE (ae.safetensors, 16 latent channels)"
CLIP_EXPECTED = "a CLIP-L text encoder (clip_l.safetensors)"
T5_EXPECTED = "a T5-XXL encoder (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors or similar)"


_load_json = core_loading.read_json
count_blocks = core_loading.count_blocks


# --------------------------------------------------------------------------------------
# Transformer


def transformer_config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """FluxTransformer2DModel settings that a diffusers-key state dict determines."""
    shape = flux_layout.logical_shape
    width, in_channels = shape(sd["x_embedder.weight"])
    head_dim = shape(sd["transformer_blocks.0.attn.norm_q.weight"])[0]
    config = {
        "in_channels": in_channels,
        "out_channels": shape(sd["proj_out.weight"])[0],
        "num_layers": count_blocks(sd, "transformer_blocks."),
        "num_single_layers": count_blocks(sd, "single_transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": shape(sd["context_embedder.weight"])[1],
        "pooled_projection_dim": shape(sd["time_text_embed.text_embedder.linear_1.weight"])[1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
    }
    check_rotary(TRANSFORMER_CONFIG_DIR, "axes_dims_rope", head_dim, "FLUX.1 transformer")
    return config


SINGLE_FILE = SingleFile(
    model_class="FluxTransformer2DModel", config_dir=TRANSFORMER_CONFIG_DIR, name="FLUX.1 transformer",
    expected=TRANSFORMER_EXPECTED, layout=flux_layout.transformer_layout, prefixes=(flux_layout.COMFY_PREFIX,),
    config_from=transformer_config_from_state_dict, to_diffusers=flux_layout.bfl_transformer_to_diffusers,
)


TRANSFORMER = ComponentSpec(
    tag="transformer", what="FLUX.1 transformer", subfolder="transformer", model_class="FluxTransformer2DModel",
    kind="diffusion", single_file=SINGLE_FILE, casts=True,
    missing="No transformer: pick a diffusers folder or a transformer file in EditKit · Flux Loader.",
)
transformer_source = TRANSFORMER.source


# --------------------------------------------------------------------------------------
# VAE


def _check_latent_channels(config: dict, path: Path) -> None:
    if config["latent_channels"] != 16:
        raise ModelFileError(path, f"A VAE with {config['latent_channels']} latent channels (not FLUX.1's 16)",
                             VAE_EXPECTED)


# BFL's ae.safetensors (LDM keys, converted by diffusers' own converter) or a diffusers-layout file; Z-Image
# uses the same VAE.
VAE_FILE = SingleFile(
    model_class="AutoencoderKL", config_dir=VAE_CONFIG_DIR, name="FLUX.1 VAE", expected=VAE_EXPECTED, kind="vae",
    prefixes=flux_layout.VAE_PREFIXES, layout=flux_layout.vae_layout, unknown="Not a VAE",
    to_diffusers=flux_layout.ldm_vae_to_diffusers, config_from=flux_layout.vae_config_from_state_dict,
    check=_check_latent_channels,
)


VAE = ComponentSpec(
    tag="vae", what="FLUX.1 VAE", subfolder="vae", model_class="AutoencoderKL", kind="vae",
    single_file=VAE_FILE, check_module=lambda module, sub: _check_latent_channels(module.config, sub),
    missing="No VAE: pick a diffusers folder or a VAE file (ae.safetensors) in EditKit · Flux Loader.",
)
vae_source = VAE.source


# --------------------------------------------------------------------------------------
# Scheduler



class FluxModel:
    """What EditKit's FLUX.1 loader hands to samplers: a lazily loaded transformer + its schedule."""

    def __init__(self, transformer: LazyModel, scheduler_config: dict):
        self.transformer = transformer
        self.scheduler_config = scheduler_config

    def __repr__(self) -> str:
        return f"<EditKit FluxModel {self.transformer!r}>"
