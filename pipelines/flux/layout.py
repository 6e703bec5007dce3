"""Key layouts of FLUX.1 checkpoints: Black Forest Labs' (BFL, what ComfyUI users have) and diffusers'.

Reading BFL files uses diffusers' own converter. Two gaps are filled here:

* diffusers' converter hard-codes the FLUX.1 width (3072) when it splits a single block's
  fused ``linear1`` into q, k, v and the MLP input. EditKit splits ``linear1`` itself at the
  width the file has, so narrower test models and any future width load through the same code
  as the real 3072-wide files.
* diffusers' converter splits a double block's fused ``qkv`` with ``torch.cat([chunk])``, which copies:
  for a mapped GGUF file that is 1.1 GB of FLUX.1-dev's 12.7 GB Q8_0 copied into the heap instead of
  staying views of the file (``scripts/bench/memory.py``: resident 1.09x the file). EditKit splits them into
  views itself, as for ``linear1``.
* diffusers' VAE converter needs the block counts, which its ``from_single_file`` takes from a config; here
  they are read from the file (:func:`ldm_vae_to_diffusers`), for FLUX.1's and FLUX.2's VAEs alike.
* diffusers has no way back. Kontext-inpaint checkpoints are saved for ComfyUI users as one
  BFL-layout file and the tiny test models are written as BFL files, so the inverse mappings
  (transformer and VAE) live here.
"""

from __future__ import annotations

import torch

from ..core.diffusers_compat import convert_flux_transformer_checkpoint_to_diffusers, convert_ldm_vae_checkpoint
from ..core.loading import count_blocks

COMFY_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")  # what checkpoints that bundle a VAE put before its keys
BATCH_NORM_KEYS = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")  # FLUX.2's latent statistics
_DIFFUSERS_FIXED_WIDTH = 3072  # the width diffusers' converter assumes


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """Shape of the weight a tensor stands for (GGUF tensors store packed bytes)."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def strip_comfy_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ComfyUI's ``model.diffusion_model.`` prefix, in place, if the file carries it."""
    for key in [k for k in state_dict if k.startswith(COMFY_PREFIX)]:
        state_dict[key[len(COMFY_PREFIX):]] = state_dict.pop(key)
    return state_dict


def transformer_layout(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``"bfl"``, ``"diffusers"`` or ``None`` (not a FLUX.1 transformer)."""
    if "img_in.weight" in state_dict and any(k.startswith("double_blocks.") for k in state_dict):
        return "bfl"
    if "x_embedder.weight" in state_dict and any(k.startswith("transformer_blocks.") for k in state_dict):
        return "diffusers"
    return None


def bfl_transformer_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a BFL-layout FLUX.1 transformer state dict (any width) to diffusers keys.

    Consumes ``state_dict``: converted entries are removed from it, so each source tensor can
    be freed once its converted copy exists and loading a 12 GB file does not need 24 GB.
    """
    checkpoint = strip_comfy_prefix(state_dict)
    width = logical_shape(checkpoint["img_in.weight"])[0]
    single_parts: dict[str, torch.Tensor] = {}
    fused_rows = 3 * _DIFFUSERS_FIXED_WIDTH + 4 * _DIFFUSERS_FIXED_WIDTH
    for key in [k for k in checkpoint if k.startswith("single_blocks.") and ".linear1." in k]:
        block = key.split(".")[1]
        kind = key.rsplit(".", 1)[1]  # weight | bias
        q, k, v, mlp = torch.split(checkpoint[key], [width, width, width, 4 * width], dim=0)
        prefix = f"single_transformer_blocks.{block}."
        single_parts[f"{prefix}attn.to_q.{kind}"] = q
        single_parts[f"{prefix}attn.to_k.{kind}"] = k
        single_parts[f"{prefix}attn.to_v.{kind}"] = v
        single_parts[f"{prefix}proj_mlp.{kind}"] = mlp
        # An empty stand-in of the shape diffusers expects; its split results are replaced below.
        checkpoint[key] = torch.empty((fused_rows, 0) if kind == "weight" else (fused_rows,))
    for key in [k for k in checkpoint if k.startswith("double_blocks.") and "_attn.qkv." in k]:
        block, stream = key.split(".")[1:3]  # stream: img_attn | txt_attn
        kind = key.rsplit(".", 1)[1]
        names = ("to_q", "to_k", "to_v") if stream == "img_attn" else ("add_q_proj", "add_k_proj", "add_v_proj")
        for name, part in zip(names, torch.chunk(checkpoint[key], 3, dim=0)):  # views, not copies
            single_parts[f"transformer_blocks.{block}.attn.{name}.{kind}"] = part
        checkpoint[key] = torch.empty((3, 0) if kind == "weight" else (3,))  # diffusers' copies of nothing
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    converted.update(single_parts)
    return converted


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """BFL stores the final modulation as (shift, scale); diffusers as (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_transformer_to_bfl(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Convert a diffusers FluxTransformer2DModel state dict to BFL keys (what ComfyUI loads).

    ``prefix`` may be ``model.diffusion_model.`` to mimic ComfyUI-saved files.
    """
    sd = state_dict
    out: dict[str, torch.Tensor] = {}

    def put(bfl_key: str, tensor: torch.Tensor) -> None:
        out[prefix + bfl_key] = tensor

    def linear(diffusers_key: str, bfl_key: str) -> None:
        for kind in ("weight", "bias"):
            if f"{diffusers_key}.{kind}" in sd:
                put(f"{bfl_key}.{kind}", sd[f"{diffusers_key}.{kind}"])

    def fused(parts: list[str], bfl_key: str) -> None:
        for kind in ("weight", "bias"):
            put(f"{bfl_key}.{kind}", torch.cat([sd[f"{p}.{kind}"] for p in parts], dim=0))

    embedders = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    for src, dst in embedders.items():
        linear(src, dst)
    put("final_layer.adaLN_modulation.1.weight", _swap_halves(sd["norm_out.linear.weight"]))
    put("final_layer.adaLN_modulation.1.bias", _swap_halves(sd["norm_out.linear.bias"]))

    double = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in double:
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        linear(s + "norm1.linear", d + "img_mod.lin")
        linear(s + "norm1_context.linear", d + "txt_mod.lin")
        fused([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"], d + "img_attn.qkv")
        fused([s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj"], d + "txt_attn.qkv")
        put(d + "img_attn.norm.query_norm.scale", sd[s + "attn.norm_q.weight"])
        put(d + "img_attn.norm.key_norm.scale", sd[s + "attn.norm_k.weight"])
        put(d + "txt_attn.norm.query_norm.scale", sd[s + "attn.norm_added_q.weight"])
        put(d + "txt_attn.norm.key_norm.scale", sd[s + "attn.norm_added_k.weight"])
        linear(s + "ff.net.0.proj", d + "img_mlp.0")
        linear(s + "ff.net.2", d + "img_mlp.2")
        linear(s + "ff_context.net.0.proj", d + "txt_mlp.0")
        linear(s + "ff_context.net.2", d + "txt_mlp.2")
        linear(s + "attn.to_out.0", d + "img_attn.proj")
        linear(s + "attn.to_add_out", d + "txt_attn.proj")

    single = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
    for i in single:
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        linear(s + "norm.linear", d + "modulation.lin")
        fused([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"], d + "linear1")
        put(d + "norm.query_norm.scale", sd[s + "attn.norm_q.weight"])
        put(d + "norm.key_norm.scale", sd[s + "attn.norm_k.weight"])
        linear(s + "proj_out", d + "linear2")
    return out


def vae_layout(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``"ldm"`` (BFL's ``ae.safetensors``, FLUX.2's ``flux2-vae.safetensors``), ``"diffusers"``, or None (no VAE)."""
    if "encoder.conv_in.weight" not in state_dict or "decoder.conv_out.weight" not in state_dict:
        return None
    return "ldm" if "encoder.down.0.block.0.conv1.weight" in state_dict else "diffusers"


def ldm_vae_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original (LDM) VAE keys → diffusers' by diffusers' own converter; FLUX.2's batch-norm statistics carry over.

    The converter renames (and slices the 1x1 attention convolutions into Linear weights: views, not copies);
    it only needs the number of down and up blocks, read here from the keys.
    """
    blocks = count_blocks(state_dict, "encoder.down.")
    config = {"down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks}
    converted = convert_ldm_vae_checkpoint(state_dict, config)
    converted.update({k: state_dict[k] for k in BATCH_NORM_KEYS if k in state_dict})
    return converted


def vae_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """``AutoencoderKL`` / ``AutoencoderKLFlux2`` settings a diffusers-key VAE state dict determines."""
    blocks = count_blocks(state_dict, "encoder.down_blocks.")
    return {
        "block_out_channels": [state_dict[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]
                               for i in range(blocks)],
        "layers_per_block": count_blocks(state_dict, "encoder.down_blocks.0.resnets."),
        "latent_channels": state_dict["encoder.conv_out.weight"].shape[0] // 2,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
    }


def diffusers_vae_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers AutoencoderKL (FLUX.1 VAE) state dict to BFL ``ae.safetensors`` keys."""
    out: dict[str, torch.Tensor] = {}
    num_up = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.up_blocks."))
    for key, tensor in state_dict.items():
        new = key
        parts = key.split(".")
        if key.startswith("encoder.down_blocks."):
            i = parts[2]
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
        elif key.startswith("decoder.up_blocks."):
            i = int(parts[2])
            j = num_up - 1 - i
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{j}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{j}.upsample.")
        elif ".mid_block.resnets." in key:
            k = int(parts[3])
            new = new.replace(f"mid_block.resnets.{k}.", f"mid.block_{k + 1}.")
        elif ".mid_block.attentions.0." in key:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for src, dst in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
                new = new.replace(f"attn_1.{src}.", f"attn_1.{dst}.")
            if tensor.ndim == 2:  # BFL keeps attention projections as 1x1 convolutions
                tensor = tensor[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out[new] = tensor
    return out
