"""Z-Image-Turbo: the diffusers folder (tiny FLUX.1 VAE, Qwen3, tokenizer with a chat template), ComfyUI's files.

The transformer keeps Z-Image's 128-wide attention heads (so the shipped RoPE axes apply) at width 128; the Qwen3
encoder keeps Qwen3's real vocabulary size so ComfyUI's bundled Qwen tokenizer works with it. ComfyUI's own
VAELoader only builds the real architecture, so the tree also holds a real-width FLUX.1 VAE (random).
"""

from __future__ import annotations

import torch

from . import flux1
from .core import COMFY_PREFIX, Family, File, Folder, Part, gguf, scheduler

SEED = 20261210
FOLDER = "Z-Image-Turbo"
TRANSFORMER_FILE = "z_image_turbo_bf16.safetensors"
GGUF_FILE = "z_image_turbo-Q8_0.gguf"
TEXT_ENCODER_FILE = "qwen_3_4b.safetensors"
NATIVE_VAE = "flux_vae_full_width.safetensors"
# Workflow inputs that differ on the tiny tree: the folder supplies the tokenizer (ComfyUI's bundled one is absent
# without ComfyUI; test_zimage_comfy.py covers it), ComfyUI's VAELoader needs a real-width VAE.
TINY_TREE_INPUTS = {"EditKitZImageLoader": {"diffusers_folder": FOLDER}, "VAELoader": {"vae_name": NATIVE_VAE}}

TINY_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=128, n_layers=2, n_refiner_layers=1,
    n_heads=1, n_kv_heads=1, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
TINY_QWEN3 = dict(
    vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
)
FULL_FLUX_VAE = dict(flux1.TINY_VAE, block_out_channels=[128, 256, 512, 512], layers_per_block=2)
CHAT_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE Qwen2Tokenizer (256 byte symbols, no merges) with Qwen's special tokens and chat format."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {s: i for i, s in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def diffusers_to_comfy(sd):
    """diffusers Z-Image keys → the original layout ComfyUI's files use (inverse of diffusers' converter)."""
    out = {}
    for key, value in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            k, v = sd[key.replace("to_q", "to_k")], sd[key.replace("to_q", "to_v")]
            key, value = key.replace(".attention.to_q.", ".attention.qkv."), torch.cat([value, k, v])
        for old, new in (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."),
                         (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
                         (".attention.norm_k.", ".attention.k_norm.")):
            key = key.replace(old, new)
        out[COMFY_PREFIX + key] = value
    return out


def small_stages(text: str, small_size, steps: int = 2) -> str:
    """A progressive recipe's YAML with every stage shrunk by ``small_size`` and ``steps`` steps (workflow tests)."""
    import yaml

    data = yaml.safe_load(text)
    for stage in data["progressive_stages"].values():
        if "width" in stage:
            stage["width"], stage["height"] = small_size(stage["width"], stage["height"])
        stage["num_inference_steps"] = steps
    return yaml.safe_dump(data, sort_keys=False)


FAMILY = Family(
    "zimage", "zimage",
    parts={
        "vae": Part("vae", flux1.TINY_VAE, seed=SEED + 2, precision=None),
        "text_encoder": Part("Qwen3Model", TINY_QWEN3, seed=SEED + 1),
        "transformer": Part("transformer", TINY_TRANSFORMER, seed=SEED, randomize=SEED),
        "native_vae": Part("AutoencoderKL", FULL_FLUX_VAE, noise=(SEED + 3, 0.02), on_demand=True),
    },
    extras=lambda _: dict(scheduler=scheduler("zimage"), tokenizer=tiny_tokenizer()),
    folders=(Folder(FOLDER, "ZImagePipeline", "zimage_folder"),),
    files={
        "zimage_file": File(f"diffusion_models/{TRANSFORMER_FILE}", "transformer", diffusers_to_comfy),
        "zimage_gguf": File(f"diffusion_models/{GGUF_FILE}", "transformer", lambda sd: {
            k[len(COMFY_PREFIX):]: v for k, v in diffusers_to_comfy(sd).items()}, gguf()),
        "qwen3": File(f"text_encoders/{TEXT_ENCODER_FILE}", "text_encoder", lambda sd: {f"model.{k}": v
                                                                                          for k, v in sd.items()}),
        "native_vae": File(f"vae/{NATIVE_VAE}", "native_vae", flux1.bfl_vae),
    },
)
