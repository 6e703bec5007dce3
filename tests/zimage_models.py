"""Tiny random Z-Image-Turbo models in the real file formats, written into a ComfyUI-style models tree.

    diffusers/Z-Image-Turbo/                       full diffusers folder (tiny tokenizer with a chat template)
    diffusion_models/z_image_turbo_bf16.safetensors  ComfyUI's key layout (fused qkv, x_embedder, final_layer,
                                                     ``model.diffusion_model.`` prefix), bf16 as released
    diffusion_models/z_image_turbo-Q8_0.gguf       GGUF Q8_0 of the same layout
    text_encoders/qwen_3_4b.safetensors            Qwen3 with ComfyUI's ``model.`` key prefix, bf16
    vae/flux_vae_full_width.safetensors            a FLUX.1 VAE of the real width (random), for ComfyUI's own
                                                   VAELoader/VAEDecode, which only build the real architecture

The transformer keeps Z-Image's 128-wide attention heads (so the shipped RoPE axes apply) at width 128; the
Qwen3 encoder keeps Qwen3's real vocabulary size so ComfyUI's bundled Qwen tokenizer works with it. Weights are
rounded to bf16 before anything is written, so every loading path sees the same numbers (GGUF differs by its
Q8_0 rounding only).
"""

from __future__ import annotations

import torch
from tiny_files import randomize_ as _randomize_
from tiny_files import round_ as _round_

FOLDER = "Z-Image-Turbo"
TRANSFORMER_FILE = "z_image_turbo_bf16.safetensors"
GGUF_FILE = "z_image_turbo-Q8_0.gguf"
TEXT_ENCODER_FILE = "qwen_3_4b.safetensors"
NATIVE_VAE = "flux_vae_full_width.safetensors"
SEED = 20261210
QWEN3_VOCAB = 151936
COMFY_PREFIX = "model.diffusion_model."
# Workflow inputs that differ on the tiny tree: the folder supplies the tokenizer (ComfyUI's bundled one is absent
# without ComfyUI; test_zimage_comfy.py covers it), ComfyUI's VAELoader needs a real-width VAE.
TINY_TREE_INPUTS = {"EditKitZImageLoader": {"diffusers_folder": FOLDER}, "VAELoader": {"vae_name": NATIVE_VAE}}

TINY_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=128, n_layers=2, n_refiner_layers=1,
    n_heads=1, n_kv_heads=1, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
TINY_QWEN3 = dict(
    vocab_size=QWEN3_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
)
CHAT_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE Qwen2Tokenizer (256 byte symbols, no merges) with Qwen's special tokens and chat format."""
    from transformers import Qwen2Tokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    vocab = {chr(c): i for i, c in enumerate(codes)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_transformer(generator: torch.Generator | None = None):
    from diffusers import ZImageTransformer2DModel

    generator = generator or torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = ZImageTransformer2DModel(**TINY_TRANSFORMER)
    _randomize_(model, generator)
    _round_(model)
    return model.eval()


def tiny_text_encoder():
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(SEED + 1)
    model = Qwen3Model(Qwen3Config(**TINY_QWEN3))
    _round_(model)
    return model.eval()


def tiny_pipeline():
    """A ZImagePipeline with tiny random components (the VAE is the tiny FLUX.1 VAE of make_tiny_models)."""
    import json

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from make_tiny_models import TINY_VAE
    from packload import pack_module

    torch.manual_seed(SEED + 2)
    vae = AutoencoderKL(**TINY_VAE).eval()
    loading = pack_module("pipelines.zimage.loading")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.loads(loading.SCHEDULER_CONFIG.read_text()))
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
                          transformer=tiny_transformer())


def diffusers_to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers Z-Image keys → the original layout ComfyUI's files use (inverse of diffusers' converter)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            k, v = sd[key.replace("to_q", "to_k")], sd[key.replace("to_q", "to_v")]
            key, value = key.replace(".attention.to_q.", ".attention.qkv."), torch.cat([value, k, v])
        key = (key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
               .replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
               .replace(".attention.norm_k.", ".attention.k_norm."))
        out[COMFY_PREFIX + key] = value
    return out


def full_width_flux_vae_bfl() -> dict[str, torch.Tensor]:
    """A random FLUX.1 VAE of the real architecture (ch 128, mults 1-2-4-4, 2 res blocks), BFL layout.

    Built on the meta device and filled with small seeded noise (norms at 1), which is quicker than
    diffusers' initialisation of 84 M parameters; only its shapes matter to the tests.
    """
    from diffusers import AutoencoderKL

    from packload import pack_module

    layout = pack_module("pipelines.flux.layout")
    with torch.device("meta"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
            latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False,
        )
    generator = torch.Generator().manual_seed(SEED + 3)
    sd = {}
    for name, tensor in vae.state_dict().items():
        if "norm" in name and name.endswith("weight"):
            sd[name] = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            sd[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16)
    return layout.diffusers_vae_to_bfl(sd)


def make_zimage_models(out) -> dict:
    """Write the Z-Image part of the tiny models tree into ``out``; return the main paths by role."""
    from pathlib import Path

    from tiny_files import save as _save
    from tiny_files import write_gguf

    out = Path(out)
    pipe = tiny_pipeline()
    folder = out / "diffusers" / FOLDER
    pipe.save_pretrained(str(folder))
    paths = {"zimage_folder": folder}
    comfy = diffusers_to_comfy(pipe.transformer.state_dict())
    paths["zimage_file"] = out / "diffusion_models" / TRANSFORMER_FILE
    _save(comfy, paths["zimage_file"], torch.bfloat16)
    paths["zimage_gguf"] = out / "diffusion_models" / GGUF_FILE
    write_gguf({k[len(COMFY_PREFIX):]: v for k, v in comfy.items()}, paths["zimage_gguf"])
    paths["qwen3"] = out / "text_encoders" / TEXT_ENCODER_FILE
    _save({f"model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}, paths["qwen3"], torch.bfloat16)
    paths["native_vae"] = out / "vae" / NATIVE_VAE
    _save(full_width_flux_vae_bfl(), paths["native_vae"], torch.bfloat16)
    return paths


def small_stages(text: str, small_size, steps: int = 2) -> str:
    """A progressive recipe's YAML with every stage shrunk by ``small_size`` and ``steps`` steps (workflow tests)."""
    import yaml

    data = yaml.safe_load(text)
    for stage in data["progressive_stages"].values():
        if "width" in stage:
            stage["width"], stage["height"] = small_size(stage["width"], stage["height"])
        stage["num_inference_steps"] = steps
    return yaml.safe_dump(data, sort_keys=False)
