"""Qwen-Image-Edit-2509 (and -2511): the folder, ComfyUI's bf16 / fp8 / fp8mixed files, GGUF, the Wan-layout VAE,
Qwen2.5-VL in ComfyUI's layout (bf16 and scaled fp8), and diffusers' reference pipelines.

Every weight is rounded to what all these files hold exactly (fp8 values times a power of two, which bf16 and fp32
also hold). The sizes keep the real structure where loaders read it from shapes: 128-wide text heads and 80-wide
vision heads (Qwen2.5-VL's), one 128-wide transformer head (so Qwen-Image's RoPE axes 16/56/56 apply), the real
152064-token vocabulary (so ComfyUI's bundled tokenizer works with the tiny encoder), 8 vision blocks (full
attention in block 7, as every 8th block of the 7B) and a VAE with two residual blocks per level (the layout
diffusers' Wan converter expects). 2511 adds no weights: its files are 2509's with ComfyUI's
``__index_timestep_zero__`` marker (the GGUF without it: only the name says 2511). The folder's tokenizer is a
byte-level one with Qwen2.5's special tokens at their real ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .core import BF16, Family, File, Folder, Part, comfy_keys, fp8, gguf, noise_filled, pack_module, scheduler

SEED = 20260925
FOLDER = "Qwen-Image-Edit-2509"
VOCAB = 152064
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TINY_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128,
                        num_attention_heads=1, joint_attention_dim=128, axes_dims_rope=(16, 56, 56))
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
TEXT_ENCODER = dict(  # Qwen2.5-VL; lm_head (unused by Qwen-Image) shares the embedding: half the file size
    text_config=dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=1, num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=4096,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                     bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True),
    vision_config=dict(depth=8, hidden_size=80, intermediate_size=48, num_heads=1, in_channels=3, out_hidden_size=128,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7], tokens_per_second=2),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=True,
)
PROCESSOR_INDEX = {"processor": ["transformers", "Qwen2VLProcessor"]}  # EditKit's processor subclass, as published
ZERO_COND_MARKER = "__index_timestep_zero__"  # ComfyUI's 2511 flag: an empty tensor (model.diffusion_model. prefix)


def tiny_tokenizer():
    """Byte-level Qwen2 tokenizer (no merges) with Qwen2.5's special tokens at their real ids."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    vocab.update({token: 151643 + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def text_extras(_built=None) -> dict:
    """Scheduler, tokenizer and processor (Qwen2.5-VL's image processor with the shipped settings)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tiny_tokenizer()
    pictures = Qwen2VLImageProcessorPil.from_pretrained(str(pack_module("pipelines.qwen_image.loading").CONFIG_DIR
                                                            / "processor"))
    return dict(scheduler=scheduler("qwen_image"), tokenizer=tokenizer,
                processor=pack_module("pipelines.qwen_image.text").make_processor(pictures, tokenizer))


def text_encoder_keys(head: bool = False):
    """transformers-5 Qwen2.5-VL keys → ComfyUI's (``model.layers.*``, ``visual.*``), ``lm_head`` kept if ``head``."""
    def convert(sd):
        out = {}
        for key, tensor in sd.items():
            if key.startswith(("model.language_model.", "model.visual.")):
                out[key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")] = tensor
            elif key == "lm_head.weight" and head:
                out[key] = tensor
        return out
    return convert


_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
           "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
           "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
_WAN = [  # (diffusers pattern, Wan-2.1 / ComfyUI replacement), first match wins
    (r"(encoder|decoder)\.conv_in\.(.*)", lambda m: f"{m[1]}.conv1.{m[2]}"),
    (r"(encoder|decoder)\.norm_out\.(.*)", lambda m: f"{m[1]}.head.0.{m[2]}"),
    (r"(encoder|decoder)\.conv_out\.(.*)", lambda m: f"{m[1]}.head.2.{m[2]}"),
    (r"quant_conv\.(.*)", lambda m: f"conv1.{m[1]}"),
    (r"post_quant_conv\.(.*)", lambda m: f"conv2.{m[1]}"),
    (r"(\w+)\.mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_RESNET[m[3]]}"),
    (r"(\w+)\.mid_block\.attentions\.0\.(.*)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
    (r"encoder\.down_blocks\.(\d+)\.(.*)", lambda m: f"encoder.downsamples.{m[1]}.{_RESNET.get(m[2], m[2])}"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
     lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_RESNET[m[3]]}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"),
]


def vae_to_wan(sd):
    """diffusers AutoencoderKLQwenImage keys → the Wan-2.1 / ComfyUI layout; checked by converting back."""
    out = {}
    for key, tensor in sd.items():
        match = next(((m, new) for pattern, new in _WAN if (m := re.fullmatch(pattern, key))), None)
        out[match[1](match[0]) if match else key] = tensor
    back = pack_module("pipelines.core.diffusers_compat").convert_wan_vae_to_diffusers(out)
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))[:5]
    return out


def _full_width_vae(_built):
    """A random Qwen-Image VAE of the real architecture: ComfyUI 0.3.64's VAELoader recognises a Wan-2.1 VAE by its
    keys and always builds the real widths (127 M parameters), so this is the smallest file it accepts."""
    from diffusers import AutoencoderKLQwenImage

    config = json.loads((pack_module("pipelines.qwen_image.loading").CONFIG_DIR / "vae" / "config.json").read_text())
    return noise_filled(AutoencoderKLQwenImage, {k: v for k, v in config.items() if not k.startswith("_")},
                        SEED + 7, 0.02)


FAMILY = Family(
    "qwen_image", "qwen_image",
    parts={
        "transformer": Part("transformer", TINY_TRANSFORMER, seed=SEED, randomize=SEED, precision="fp8"),
        "vae": Part("vae", TINY_VAE, seed=SEED + 1, precision="fp8"),
        "text_encoder": Part("Qwen2_5_VLForConditionalGeneration", TEXT_ENCODER, noise=(SEED, 0.05),
                             precision="fp8_scaled"),
        "native_vae": Part(_full_width_vae, on_demand=True),
    },
    extras=text_extras,
    folders=(Folder(FOLDER, "QwenImageEditPlusPipeline", dtype=BF16, index=PROCESSOR_INDEX),),
    files={
        "bf16": File("diffusion_models/qwen_image_edit_2509_bf16.safetensors", "transformer", comfy_keys),
        "fp8": File("diffusion_models/qwen_image_edit_2509_fp8_e4m3fn.safetensors", "transformer", comfy_keys,
                    fp8("plain")),
        "gguf": File("diffusion_models/Qwen-Image-Edit-2509-Q8_0.gguf", "transformer", None,
                     gguf("qwen_image", FOLDER)),
        "bf16_2511": File("diffusion_models/qwen_image_edit_2511_bf16.safetensors", "transformer", comfy_keys,
                          extra={ZERO_COND_MARKER: torch.zeros(0)}),
        "fp8mixed_2511": File("diffusion_models/qwen_image_edit_2511_fp8mixed.safetensors", "transformer", comfy_keys,
                              fp8("mixed"), extra={ZERO_COND_MARKER: torch.zeros(0)}),
        "gguf_2511": File("diffusion_models/qwen-image-edit-2511-Q8_0.gguf", "transformer", None, gguf("qwen_image")),
        "vae": File("vae/qwen_image_vae.safetensors", "vae", vae_to_wan),
        "te_bf16": File("text_encoders/qwen_2.5_vl_7b.safetensors", "text_encoder", text_encoder_keys()),
        "te_fp8": File("text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoder", text_encoder_keys(),
                       fp8("scaled")),
    },
)

FILES = {role: Path(file.path).name for role, file in FAMILY.files.items()}
FILES["native_vae"] = "qwen_image_vae_full_width.safetensors"  # written by the tests that need it (127 M parameters)


def full_width_vae_wan() -> dict[str, torch.Tensor]:
    """The real-width VAE's weights in ComfyUI's Wan-2.1 key layout, bf16 (for ComfyUI's own VAELoader)."""
    return {k: v.to(BF16) for k, v in vae_to_wan(FAMILY.build("native_vae").state_dict()).items()}


def reference_pipeline(components: dict, variant: str = "plus"):
    """diffusers' QwenImageEditPlusPipeline (or QwenImageEditPipeline) on the tiny components."""
    return FAMILY.pipeline(components, "QwenImageEditPlusPipeline" if variant == "plus" else "QwenImageEditPipeline")


def transformer_2511(components: dict):
    """The tiny transformer configured as Qwen-Image-Edit-2511 (``zero_cond_t``), with the same weights."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(**TINY_TRANSFORMER, zero_cond_t=True).eval()
    model.load_state_dict(components["transformer"].state_dict(), strict=True)
    return model.requires_grad_(False)
