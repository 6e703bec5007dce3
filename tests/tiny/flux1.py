"""FLUX.1: Fill (folder, BFL file, GGUF), dev (file, GGUF, and a FluxPipeline folder), Kontext-inpaint, VAE, CLIP-L, T5.

The widths are tiny but keep FLUX.1's structure: one 128-wide attention head (so the shipped RoPE config applies),
a 4-level VAE (scale factor 8, so Fill keeps its 384 input features), and CLIP/T5 vocabularies of the real size,
so the tiny encoders also work with ComfyUI's bundled tokenizers.
"""

from __future__ import annotations

import copy
import string

from .core import FP16, Family, File, Folder, Part, gguf, pack_module, safetensors, scheduler

SEED = 20261125
TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
    num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=64, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32], layers_per_block=1,
    latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)
CLIP = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
            projection_dim=64)
T5 = dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
          feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6,
          tie_word_embeddings=False)


def clip_tokenizer():
    """CLIP's byte-level BPE with one token per byte (and its ``</w>`` form), no merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)} | {s + "</w>": len(symbols) + i for i, s in enumerate(symbols)}
    vocab.update({"<|startoftext|>": 2 * len(symbols), "<|endoftext|>": 2 * len(symbols) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77)


def t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    return T5TokenizerFast(vocab=pieces + [(c, -3.0) for c in string.printable if not c.isspace()], extra_ids=0)


def bfl(sd):
    return pack_module("pipelines.flux.layout").diffusers_transformer_to_bfl(sd)


def bfl_vae(sd):
    return pack_module("pipelines.flux.layout").diffusers_vae_to_bfl(sd)


def _kontext(built):
    """A "trained" Kontext-inpaint transformer: Fill widened with non-zero mask-image columns."""
    widen = pack_module("pipelines.flux.kontext_inpaint").widen_fill_transformer
    return widen(copy.deepcopy(built["transformer"]), init="small_random", std=0.05, seed=SEED)


FAMILY = Family(
    "flux1", "flux",
    parts={
        "transformer": Part("transformer", TINY_TRANSFORMER, seed=SEED, randomize=SEED),
        "vae": Part("vae", TINY_VAE, precision=None),  # seeds: the RNG goes on, as in diffusers' pipelines
        "text_encoder": Part("CLIPTextModel", CLIP, precision=FP16),
        "text_encoder_2": Part("T5EncoderModel", T5, precision=FP16),
        "dev": Part("transformer", dict(TINY_TRANSFORMER, in_channels=64, out_channels=None), seed=SEED + 1,
                    randomize=SEED + 1),
        "kontext": Part(_kontext),
    },
    extras=lambda _: dict(scheduler=scheduler("flux"), tokenizer=clip_tokenizer(),
                          tokenizer_2=t5_tokenizer()),
    folders=(Folder("FLUX.1-Fill-dev", "FluxFillPipeline", "fill_folder"),
             Folder("FLUX.1-dev", "FluxPipeline", "dev_folder", swap={"transformer": "dev"})),
    files={
        "fill_bfl": File("diffusion_models/flux1-fill-dev.safetensors", "transformer", bfl),
        "fill_gguf": File("diffusion_models/flux1-fill-dev-Q8_0.gguf", "transformer", bfl, gguf()),
        "dev_bfl": File("diffusion_models/flux1-dev.safetensors", "dev", bfl),
        "dev_gguf": File("diffusion_models/flux1-dev-Q8_0.gguf", "dev", bfl, gguf()),
        "kontext_bfl": File("diffusion_models/flux1-kontext-inpaint.safetensors", "kontext", bfl),
        "vae": File("vae/ae.safetensors", "vae", bfl_vae, safetensors(None)),
        "clip_l": File("text_encoders/clip_l.safetensors", "text_encoder", lambda sd: {  # ComfyUI's clip_l keys
            k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()
            if not k.endswith("position_ids")}, safetensors(FP16)),
        "t5": File("text_encoders/t5xxl_fp16.safetensors", "text_encoder_2",
                   lambda sd: {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}, safetensors(FP16)),
    },
)
