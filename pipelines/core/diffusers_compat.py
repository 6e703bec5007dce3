"""Every call EditKit makes into diffusers' non-public helpers, in one place.

diffusers exports pipelines and models as its public API; the single-file key converters, the
GGUF reader and dequantizer and the LoRA state-dict converters live in modules it may move or
change between releases. EditKit reaches them only through the functions below (each imported
when first called, so importing the pack does not import diffusers), and
``tests/test_diffusers_compat.py`` checks each one against the installed diffusers, so a
release that moves one fails there, with the name of the helper, instead of deep in a loader.
"""

from __future__ import annotations

import importlib

from .errors import EditKitError

# (module, attribute) of every private helper EditKit uses.
PRIVATE_HELPERS = {
    "convert_flux_transformer": ("diffusers.loaders.single_file_utils", "convert_flux_transformer_checkpoint_to_diffusers"),
    "load_gguf_checkpoint": ("diffusers.models.model_loading_utils", "load_gguf_checkpoint"),
    "dequantize_gguf_tensor": ("diffusers.quantizers.gguf.utils", "dequantize_gguf_tensor"),
    "convert_wan_vae": ("diffusers.loaders.single_file_utils", "convert_wan_vae_to_diffusers"),
    "convert_ldm_vae": ("diffusers.loaders.single_file_utils", "convert_ldm_vae_checkpoint"),
    "convert_flux2_transformer": ("diffusers.loaders.single_file_utils",
                                  "convert_flux2_transformer_checkpoint_to_diffusers"),
}


def helper(name: str):
    """The diffusers function registered as ``name``, with an error that names the diffusers version."""
    module_name, attribute = PRIVATE_HELPERS[name]
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        import diffusers

        raise EditKitError(
            f"This diffusers ({diffusers.__version__}) has no {module_name}.{attribute}, which EditKit needs "
            f"({name}). Install a diffusers version from EditKit's requirements.txt."
        ) from exc


def convert_flux_transformer_checkpoint_to_diffusers(checkpoint: dict) -> dict:
    return helper("convert_flux_transformer")(checkpoint)


def convert_flux2_transformer_checkpoint_to_diffusers(checkpoint: dict) -> dict:
    """FLUX.2 BFL keys → diffusers' (splits the fused qkv and swaps the adaLN halves)."""
    return helper("convert_flux2_transformer")(checkpoint)


def load_gguf_checkpoint(path: str) -> dict:
    return helper("load_gguf_checkpoint")(path)


def dequantize_gguf_tensor(tensor):
    return helper("dequantize_gguf_tensor")(tensor)


def convert_wan_vae_to_diffusers(checkpoint: dict) -> dict:
    """Wan-2.1 / ComfyUI key layout → diffusers' (also Qwen-Image's VAE, which shares the layout)."""
    return helper("convert_wan_vae")(checkpoint)


def convert_ldm_vae_checkpoint(checkpoint: dict, config: dict) -> dict:
    """Original (LDM / BFL ``ae.safetensors``) VAE keys → diffusers' ``AutoencoderKL`` keys.

    What diffusers' ``AutoencoderKL.from_single_file`` converts with; ``config`` needs only
    ``down_block_types`` and ``up_block_types`` (their lengths are the block counts). Keys it does not know
    (FLUX.2's latent batch-norm statistics) are dropped.
    """
    return helper("convert_ldm_vae")(checkpoint, config)
