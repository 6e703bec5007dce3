"""Loading FLUX.2 [klein] offline: transformer, VAE, scheduler and the Qwen3 text encoder.

Sources (the files people download):

* the diffusers folder (``models/diffusers/FLUX.2-klein-4B`` or ``-9B``, ``-base-`` variants): every
  component; its ``model_index.json`` says whether the model is step-distilled (``is_distilled``);
* ComfyUI-style single transformer files in BFL's key layout (``double_blocks.0.img_attn.qkv.weight``,
  ``single_stream_modulation.lin.weight``; with or without ComfyUI's ``model.diffusion_model.`` prefix,
  e.g. ``flux-2-klein-4b.safetensors``), diffusers-layout files, and GGUF files of either layout. The
  config is read from the file's own tensor shapes (4B and 9B differ in width, depth and text width),
  and BFL keys are mapped to diffusers' by diffusers' own converter
  (``convert_flux2_transformer_checkpoint_to_diffusers``);
* the FLUX.2 VAE as one file (``flux2-vae.safetensors``: original/LDM key layout plus the latent
  batch-norm statistics ``bn.running_mean`` / ``bn.running_var``; or diffusers keys), converted with
  diffusers' ``convert_ldm_vae_checkpoint`` (FLUX.1's VAE layout helpers, :mod:`..flux.layout`);
* the transformer and VAE are declared as :class:`..core.family.ComponentSpec` s (folder loading, identity,
  caching and precision are the shared code's); both files are :class:`..core.single_file.SingleFile`
  declarations read by the shared reader (transformer: fp8 kept in fp8, GGUF quantized; VAE: one dtype);
* the Qwen3 text encoder (``qwen_3_4b.safetensors`` for klein 4B, ``qwen_3_8b*.safetensors`` for 9B) through
  Z-Image's Qwen3 loader (:mod:`..zimage.text`), wrapped in klein's prompt recipe (:mod:`.text`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core import loading as core_loading
from ..core.errors import ModelFileError
from ..core.family import ComponentSpec
from ..core.loading import count_blocks, strip_prefix
from ..core.single_file import SingleFile, check_rotary
from ..flux.layout import VAE_PREFIXES, ldm_vae_to_diffusers, logical_shape, vae_config_from_state_dict, vae_layout
from .latent import LATENT_CHANNELS, MODEL_CHANNELS

log = logging.getLogger("EditKit")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TRANSFORMER_CONFIG_DIR = CONFIG_DIR / "klein_transformer"
VAE_CONFIG_DIR = CONFIG_DIR / "flux2_vae"
SCHEDULER_CONFIG = CONFIG_DIR / "klein_scheduler" / "scheduler_config.json"
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

TRANSFORMER_EXPECTED = (
    "a FLUX.2 [klein] transformer (.safetensors in BFL/ComfyUI layout, keys like "
    "'single_stream_modulation.lin.weight', e.g. flux-2-klein-4b.safetensors; diffusers layout; or a .gguf of either)"
)
VAE_EXPECTED = "the FLUX.2 VAE (flux2-vae.safetensors: 32 latent channels with batch-norm statistics 'bn.running_mean')"


_load_json = core_loading.read_json


# --------------------------------------------------------------------------------------
# Transformer


def transformer_layout(sd: dict[str, torch.Tensor]) -> str | None:
    """``"bfl"`` (BFL / ComfyUI keys), ``"diffusers"``, ``"flux1"`` (a FLUX.1 file) or ``None``."""
    if "single_stream_modulation.linear.weight" in sd:
        return "diffusers"
    if "single_stream_modulation.lin.weight" in sd:
        return "bfl"
    if any(k.startswith(("double_blocks.", "transformer_blocks.")) for k in sd):
        return "flux1"
    return None


def transformer_config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """Flux2Transformer2DModel settings that a diffusers-key state dict determines (4B, 9B, tiny)."""
    width, in_channels = logical_shape(sd["x_embedder.weight"])
    head_dim = logical_shape(sd["transformer_blocks.0.attn.norm_q.weight"])[0]
    ff_rows = logical_shape(sd["transformer_blocks.0.ff.linear_in.weight"])[0]
    check_rotary(TRANSFORMER_CONFIG_DIR, "axes_dims_rope", head_dim, "FLUX.2 transformer")
    return {
        "in_channels": in_channels,
        "out_channels": logical_shape(sd["proj_out.weight"])[0],
        "num_layers": count_blocks(sd, "transformer_blocks."),
        "num_single_layers": count_blocks(sd, "single_transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": logical_shape(sd["context_embedder.weight"])[1],
        "mlp_ratio": ff_rows / 2 / width,  # SwiGLU: linear_in holds gate and value
        "guidance_embeds": "time_guidance_embed.guidance_embedder.linear_1.weight" in sd,
    }


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return strip_prefix(sd, COMFY_PREFIXES)


def _to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL keys → diffusers keys with diffusers' own converter (it splits fused qkv and swaps adaLN halves)."""
    from ..core.diffusers_compat import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers(dict(sd))


def _check_channels(config: dict, where: Path) -> None:
    if config["in_channels"] != MODEL_CHANNELS:
        raise ModelFileError(where, f"The transformer reads {config['in_channels']} input features, not FLUX.2's "
                                    f"{MODEL_CHANNELS} (32 latent channels x 2x2 patches)", TRANSFORMER_EXPECTED)


SINGLE_FILE = SingleFile(
    model_class="Flux2Transformer2DModel", config_dir=TRANSFORMER_CONFIG_DIR, name="FLUX.2 transformer",
    expected=TRANSFORMER_EXPECTED, layout=transformer_layout, prefixes=COMFY_PREFIXES,
    foreign=(("flux1", "This is a FLUX.1 transformer, not FLUX.2 (load it with EditKit · Flux Loader)"),),
    config_from=transformer_config_from_state_dict, to_diffusers=_to_diffusers, check=_check_channels,
)


def _check_folder_channels(module: torch.nn.Module, sub: Path) -> None:
    if module.config.in_channels != MODEL_CHANNELS:
        raise ModelFileError(sub, f"The transformer reads {module.config.in_channels} input features, not FLUX.2's "
                                  f"{MODEL_CHANNELS}", TRANSFORMER_EXPECTED)


TRANSFORMER = ComponentSpec(
    tag="flux2_transformer", what="FLUX.2 transformer", subfolder="transformer",
    model_class="Flux2Transformer2DModel", kind="diffusion", single_file=SINGLE_FILE,
    missing="No transformer: pick a diffusers folder or a transformer file (flux-2-klein-4b.safetensors or a .gguf) "
            "in EditKit · FLUX.2 Loader.",
    check_module=_check_folder_channels, casts=True,
)
transformer_source = TRANSFORMER.source


# --------------------------------------------------------------------------------------
# VAE


def _vae_layout(sd: dict[str, torch.Tensor]) -> str | None:
    """FLUX.1's VAE layouts, and ``"no statistics"`` for a VAE without FLUX.2's latent batch-norm statistics."""
    layout = vae_layout(sd)
    return "no statistics" if layout is not None and "bn.running_mean" not in sd else layout


def _without_statistics(sd: dict[str, torch.Tensor]) -> str:
    conv_out = sd.get("encoder.conv_out.weight")
    channels = conv_out.shape[0] // 2 if conv_out is not None else 0
    what = "the FLUX.1 VAE (ae.safetensors)" if channels == 16 else f"a {channels}-channel VAE"
    return f"This is {what}: it has no latent batch-norm statistics"


def _check_latent_channels(config: dict, path: Path) -> None:
    if config["latent_channels"] != LATENT_CHANNELS:
        raise ModelFileError(path, f"A VAE with {config['latent_channels']} latent channels (not FLUX.2's 32)",
                             VAE_EXPECTED)


# FLUX.1's VAE architecture and layouts (LDM keys converted by diffusers' converter) plus the latent batch-norm
# statistics, which carry over from either layout.
VAE_FILE = SingleFile(
    model_class="AutoencoderKLFlux2", config_dir=VAE_CONFIG_DIR, name="FLUX.2 VAE", expected=VAE_EXPECTED, kind="vae",
    prefixes=VAE_PREFIXES, layout=_vae_layout, unknown="Not a VAE", foreign=(("no statistics", _without_statistics),),
    to_diffusers=ldm_vae_to_diffusers, config_from=vae_config_from_state_dict, check=_check_latent_channels,
)


VAE = ComponentSpec(
    tag="flux2_vae", what="FLUX.2 VAE", subfolder="vae", model_class="AutoencoderKLFlux2", kind="vae",
    single_file=VAE_FILE,
    missing="No VAE: pick a diffusers folder or the FLUX.2 VAE file (flux2-vae.safetensors) in EditKit · FLUX.2 "
            "Loader.",
    check_module=lambda module, sub: _check_latent_channels(module.config, sub),
)
vae_source = VAE.source


# --------------------------------------------------------------------------------------
# Scheduler and the model handle



def is_distilled(folder: Path | None) -> bool | None:
    """What the folder's ``model_index.json`` says (klein 4B/9B: true; the ``base`` models: false), else None."""
    if folder is None or not (folder / "model_index.json").is_file():
        return None
    value = _load_json(folder / "model_index.json").get("is_distilled")
    return None if value is None else bool(value)


class Flux2Model:
    """What EditKit's FLUX.2 loader hands to samplers: a lazily loaded transformer and its schedule.

    LoRA nodes return a copy whose ``transformer`` also applies their LoRAs while a sampler runs.
    """

    def __init__(self, transformer, scheduler_config: dict, distilled: bool | None = None):
        self.transformer = transformer
        self.scheduler_config = scheduler_config
        self.distilled = distilled

    def __repr__(self) -> str:
        return f"<EditKit Flux2Model {self.transformer!r}>"
