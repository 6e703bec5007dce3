"""Tiny random FLUX.2 [klein] models in the real file formats, written into a ComfyUI-style models tree.

    diffusers/FLUX.2-klein-tiny/                  full diffusers folder (Flux2KleinPipeline, is_distilled true)
    diffusion_models/flux-2-klein-4b.safetensors    BFL/ComfyUI key layout (fused qkv, ``lin`` modulations,
                                                    ``model.diffusion_model.`` prefix), bf16 as released
    diffusion_models/flux-2-klein-4b-Q8_0.gguf      GGUF Q8_0 of the BFL layout (no prefix, as GGUF converters write)
    vae/flux2-vae.safetensors                       the VAE in the original (LDM) layout with its bn statistics
    text_encoders/qwen_3_tiny_klein.safetensors     Qwen3 with ComfyUI's ``model.`` key prefix

Single files carry the published names, so the bundled workflows run on the tiny tree as written (only the text
encoder comes from the folder there: ``TINY_TREE_INPUTS``). The transformer keeps FLUX.2's 128-wide attention heads (so the shipped rotary axes apply); the Qwen3 encoder has
4 layers, so klein's feature layers are (1, 2, 3) and the text width is 3 x 16. The VAE's batch-norm statistics are
random (not 0 and 1), so a wrong latent normalisation shows. Weights are rounded to bf16 before anything is
written, so every loading path sees the same numbers (GGUF differs by its Q8_0 rounding only).
"""

from __future__ import annotations

from pathlib import Path

import torch

FOLDER = "FLUX.2-klein-tiny"
TRANSFORMER_FILE = "flux-2-klein-4b.safetensors"
GGUF_FILE = "flux-2-klein-4b-Q8_0.gguf"
VAE_FILE = "flux2-vae.safetensors"
TEXT_ENCODER_FILE = "qwen_3_tiny_klein.safetensors"
SEED = 20261206
COMFY_PREFIX = "model.diffusion_model."
# Workflow inputs that differ on the tiny tree: the folder supplies the tokenizer and the 4-layer text encoder
# (the tree's qwen_3_4b.safetensors is Z-Image's tiny 3-layer one).
TINY_TREE_INPUTS = {"EditKitFlux2Loader": {"diffusers_folder": FOLDER, "text_encoder_file": "(from folder)"}}

TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=1,
    joint_attention_dim=48, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32], layers_per_block=1,
    latent_channels=32, norm_num_groups=32, sample_size=64, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True, batch_norm_eps=1e-4,
)


def tiny_transformer():
    from diffusers import Flux2Transformer2DModel
    from zimage_models import _randomize_, _round_

    torch.manual_seed(SEED)
    model = Flux2Transformer2DModel(**TINY_TRANSFORMER)
    _randomize_(model, torch.Generator().manual_seed(SEED))
    _round_(model)
    return model.eval()


def tiny_vae():
    from diffusers import AutoencoderKLFlux2
    from zimage_models import _round_

    torch.manual_seed(SEED + 1)
    vae = AutoencoderKLFlux2(**TINY_VAE)
    g = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.3)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) * 2 + 0.2)
    _round_(vae)
    return vae.eval()


def tiny_text_encoder():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from zimage_models import TINY_QWEN3, _round_

    torch.manual_seed(SEED + 3)
    model = Qwen3ForCausalLM(Qwen3Config(**{**TINY_QWEN3, "num_hidden_layers": 4}))
    _round_(model)
    return model.eval()


def tiny_pipeline():
    """A Flux2KleinPipeline with tiny random components (distilled, as the published klein 4B)."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from zimage_models import tiny_tokenizer

    from packload import pack_module

    loading = pack_module("pipelines.flux2.loading")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.loads(loading.SCHEDULER_CONFIG.read_text()))
    return Flux2KleinPipeline(scheduler=scheduler, vae=tiny_vae(), text_encoder=tiny_text_encoder(),
                              tokenizer=tiny_tokenizer(), transformer=tiny_transformer(), is_distilled=True)


def diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FLUX.2 transformer keys → BFL's (the inverse of diffusers' converter), for the single files."""
    def swap(t):
        shift, scale = t.chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)

    out: dict[str, torch.Tensor] = {}
    simple = {
        "x_embedder": "img_in", "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
        "proj_out": "final_layer.linear",
    }
    double = {
        "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
        "attn.to_out.0.weight": "img_attn.proj.weight", "ff.linear_in.weight": "img_mlp.0.weight",
        "ff.linear_out.weight": "img_mlp.2.weight", "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
        "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_add_out.weight": "txt_attn.proj.weight",
        "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight",
    }
    single = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
              "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
    for key, value in sd.items():
        if key.startswith("norm_out.linear."):
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = swap(value)
        elif key.startswith("transformer_blocks."):
            _, n, rest = key.split(".", 2)
            if rest.startswith(("attn.to_q.", "attn.add_q_proj.")):
                img = rest.startswith("attn.to_q.")
                names = ("to_q", "to_k", "to_v") if img else ("add_q_proj", "add_k_proj", "add_v_proj")
                parts = [sd[f"transformer_blocks.{n}.attn.{p}.weight"] for p in names]
                out[f"double_blocks.{n}.{'img' if img else 'txt'}_attn.qkv.weight"] = torch.cat(parts)
            elif rest.startswith(("attn.to_k.", "attn.to_v.", "attn.add_k_proj.", "attn.add_v_proj.")):
                continue
            else:
                out[f"double_blocks.{n}.{double[rest]}"] = value
        elif key.startswith("single_transformer_blocks."):
            _, n, rest = key.split(".", 2)
            out[f"single_blocks.{n}.{single[rest]}"] = value
        else:
            module, param = key.rsplit(".", 1)
            out[f"{simple[module]}.{param}"] = value
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers VAE keys → the original (LDM/BFL) layout, keeping the bn statistics."""
    from packload import pack_module

    layout = pack_module("pipelines.flux.layout")
    plain = {k: v for k, v in sd.items() if not k.startswith(("bn.", "quant_conv.", "post_quant_conv."))}
    out = layout.diffusers_vae_to_bfl(plain)
    for key, value in sd.items():
        if key.startswith(("bn.", "quant_conv.", "post_quant_conv.")):
            out[key] = value
    return out


def make_flux2_models(out) -> dict:
    """Write the FLUX.2 [klein] part of the tiny models tree into ``out``; return the main paths by role."""
    from make_tiny_models import _save, write_gguf

    out = Path(out)
    pipe = tiny_pipeline()
    folder = out / "diffusers" / FOLDER
    pipe.save_pretrained(str(folder))
    paths = {"flux2_folder": folder}
    bfl = diffusers_to_bfl(pipe.transformer.state_dict())
    paths["flux2_file"] = out / "diffusion_models" / TRANSFORMER_FILE
    _save({COMFY_PREFIX + k: v for k, v in bfl.items()}, paths["flux2_file"], torch.bfloat16)
    paths["flux2_gguf"] = out / "diffusion_models" / GGUF_FILE
    write_gguf(bfl, paths["flux2_gguf"])
    paths["flux2_vae"] = out / "vae" / VAE_FILE
    _save(vae_to_ldm(pipe.vae.state_dict()), paths["flux2_vae"])
    paths["flux2_qwen3"] = out / "text_encoders" / TEXT_ENCODER_FILE
    _save({f"model.{k}": v for k, v in pipe.text_encoder.model.state_dict().items()}, paths["flux2_qwen3"],
          torch.bfloat16)
    return paths
