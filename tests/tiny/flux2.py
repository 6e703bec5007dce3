"""FLUX.2 [klein]: the diffusers folder (distilled, as klein 4B), the BFL file and GGUF, the VAE, a Qwen3 file.

Single files carry the published names, so the bundled workflows run on the tiny tree as written (only the text
encoder comes from the folder there: ``TINY_TREE_INPUTS``). The transformer keeps FLUX.2's 128-wide attention heads
(so the shipped rotary axes apply); the Qwen3 encoder has 4 layers, so klein's feature layers are (1, 2, 3) and the
text width is 3 x 16. The VAE's batch-norm statistics are random (not 0 and 1), so a wrong latent normalisation shows.
"""

from __future__ import annotations

import torch

from . import flux1, zimage
from .core import COMFY_PREFIX, Family, File, Folder, Part, gguf, safetensors, scheduler

SEED = 20261206
FOLDER = "FLUX.2-klein-tiny"
TRANSFORMER_FILE = "flux-2-klein-4b.safetensors"
GGUF_FILE = "flux-2-klein-4b-Q8_0.gguf"
VAE_FILE = "flux2-vae.safetensors"
TEXT_ENCODER_FILE = "qwen_3_tiny_klein.safetensors"
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


def _random_statistics(vae) -> None:
    g = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.3)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) * 2 + 0.2)


_SIMPLE = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
           **{f"{m}.linear": f"{m}.lin" for m in ("double_stream_modulation_img", "double_stream_modulation_txt",
                                                   "single_stream_modulation")}}
_DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
           "attn.to_out.0.weight": "img_attn.proj.weight", "ff.linear_in.weight": "img_mlp.0.weight",
           "ff.linear_out.weight": "img_mlp.2.weight", "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
           "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_add_out.weight": "txt_attn.proj.weight",
           "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight"}
_SINGLE = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
           "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_QKV = {"attn.to_q.weight": ("img", "to_q", "to_k", "to_v"),
        "attn.add_q_proj.weight": ("txt", "add_q_proj", "add_k_proj", "add_v_proj")}


def diffusers_to_bfl(sd):
    """diffusers FLUX.2 transformer keys → BFL's (the inverse of diffusers' converter), for the single files."""
    out = {}
    for key, value in sd.items():
        block, _, rest = key.partition(".")
        if key.startswith("norm_out.linear."):  # diffusers' (shift, scale) is BFL's (scale, shift)
            shift, scale = value.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift], dim=0)
        elif block in ("transformer_blocks", "single_transformer_blocks"):
            n, _, rest = rest.partition(".")
            if rest in _QKV:
                side, *names = _QKV[rest]
                out[f"double_blocks.{n}.{side}_attn.qkv.weight"] = torch.cat([sd[f"{block}.{n}.attn.{p}.weight"]
                                                                             for p in names])
            elif block == "single_transformer_blocks":
                out[f"single_blocks.{n}.{_SINGLE[rest]}"] = value
            elif not rest.startswith(("attn.to_k.", "attn.to_v.", "attn.add_k_proj.", "attn.add_v_proj.")):
                out[f"double_blocks.{n}.{_DOUBLE[rest]}"] = value
        else:
            module, param = key.rsplit(".", 1)
            out[f"{_SIMPLE[module]}.{param}"] = value
    return out


def vae_to_ldm(sd):
    """diffusers VAE keys → the original (LDM/BFL) layout, keeping the bn statistics and quant convs."""
    extra = ("bn.", "quant_conv.", "post_quant_conv.")
    return flux1.bfl_vae({k: v for k, v in sd.items() if not k.startswith(extra)}) | {
        k: v for k, v in sd.items() if k.startswith(extra)}


FAMILY = Family(
    "flux2", "flux2",
    parts={
        "vae": Part("vae", TINY_VAE, seed=SEED + 1, adjust=_random_statistics),
        "text_encoder": Part("Qwen3ForCausalLM", dict(zimage.TINY_QWEN3, num_hidden_layers=4), seed=SEED + 3),
        "transformer": Part("transformer", TINY_TRANSFORMER, seed=SEED, randomize=SEED),
    },
    extras=lambda _: dict(scheduler=scheduler("flux2"), tokenizer=zimage.tiny_tokenizer()),
    folders=(Folder(FOLDER, "Flux2KleinPipeline", "flux2_folder", kwargs=dict(is_distilled=True)),),
    files={
        "flux2_file": File(f"diffusion_models/{TRANSFORMER_FILE}", "transformer",
                           lambda sd: {COMFY_PREFIX + k: v for k, v in diffusers_to_bfl(sd).items()}),
        "flux2_gguf": File(f"diffusion_models/{GGUF_FILE}", "transformer", diffusers_to_bfl, gguf()),
        "flux2_vae": File(f"vae/{VAE_FILE}", "vae", vae_to_ldm, safetensors(None)),
        "flux2_qwen3": File(f"text_encoders/{TEXT_ENCODER_FILE}", "text_encoder",
                            lambda sd: {k: v for k, v in sd.items() if k.startswith("model.")}),
    },
)
