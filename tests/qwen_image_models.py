"""Tiny random Qwen-Image-Edit-2509 models in the real file formats, and diffusers' reference pipeline.

    python tests/qwen_image_models.py OUT_DIR     # writes the files below into a models tree

    diffusers/Qwen-Image-Edit-2509/                     full diffusers folder (tiny tokenizer + processor)
    diffusion_models/qwen_image_edit_2509_bf16.safetensors        ComfyUI layout (model.diffusion_model.*)
    diffusion_models/qwen_image_edit_2509_fp8_e4m3fn.safetensors  same, 2-D weights stored as fp8
    diffusion_models/Qwen-Image-Edit-2509-Q8_0.gguf               GGUF Q8_0 (city96 layout: no prefix)
    diffusion_models/qwen_image_edit_2511_bf16.safetensors        Qwen-Image-Edit-2511: the same weights (2511 adds
    diffusion_models/qwen_image_edit_2511_fp8mixed.safetensors    none) with ComfyUI's __index_timestep_zero__ marker;
    diffusion_models/qwen-image-edit-2511-Q8_0.gguf               fp8mixed as Comfy-Org's (weight_scale per layer);
                                                                  the GGUF without the marker (told by its name)
    vae/qwen_image_vae.safetensors                      ComfyUI's Wan-VAE key layout, bf16
    vae/qwen_image_vae_full_width.safetensors           the same layout at the real width (random), for ComfyUI's
                                                        own VAELoader, which only builds the real architecture
    text_encoders/qwen_2.5_vl_7b.safetensors            ComfyUI layout (model.layers.*, visual.*), bf16
    text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors ComfyUI's scaled fp8 (weight/scale in fp8 + scale_weight)

Every weight is first rounded to what all these files can hold exactly (fp8 values times a power
of two, which bf16 and fp32 also hold), so every dense loading path sees the same numbers and
only GGUF differs (by its Q8_0 rounding). The sizes keep the real structure where loaders read
it from shapes: 128-wide text heads and 80-wide vision heads (Qwen2.5-VL's), one 128-wide
transformer head (so Qwen-Image's RoPE axes 16/56/56 apply), the real 152064-token vocabulary
(so ComfyUI's bundled tokenizer works with the tiny encoder), 8 vision blocks (full attention in
block 7, as every 8th block of the 7B) and a VAE with two residual blocks per level (the layout
diffusers' Wan converter expects). The folder's tokenizer is a byte-level one with Qwen2.5's
special tokens at their real ids.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_files  # noqa: E402
from tiny_files import randomize_ as _randomize_  # noqa: E402
from tiny_files import save as _save  # noqa: E402

from packload import offline, pack_module  # noqa: E402

FOLDER = "Qwen-Image-Edit-2509"
SEED = 20260925
VOCAB = 152064
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TINY_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128,
                        num_attention_heads=1, joint_attention_dim=128, axes_dims_rope=(16, 56, 56))
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
FILES = {
    "bf16": "qwen_image_edit_2509_bf16.safetensors",
    "fp8": "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
    "gguf": "Qwen-Image-Edit-2509-Q8_0.gguf",
    "bf16_2511": "qwen_image_edit_2511_bf16.safetensors",
    "fp8mixed_2511": "qwen_image_edit_2511_fp8mixed.safetensors",
    "gguf_2511": "qwen-image-edit-2511-Q8_0.gguf",
    "vae": "qwen_image_vae.safetensors",
    "native_vae": "qwen_image_vae_full_width.safetensors",
    "te_bf16": "qwen_2.5_vl_7b.safetensors",
    "te_fp8": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
}


def _pow2_scale(weight: torch.Tensor) -> float:
    """A power of two that maps the weight's largest value into fp8 e4m3's range."""
    peak = float(weight.abs().max()) or 1.0
    return 2.0 ** round(torch.log2(torch.tensor(peak / 256.0)).item())


def _round_fp8_(module: torch.nn.Module, scaled: bool) -> dict[str, float]:
    """Round 2-D weights to fp8 (times a power-of-two scale when ``scaled``), the rest to bf16."""
    scales = {}
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if tensor.ndim == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name:
                scale = _pow2_scale(tensor) if scaled else 1.0
                tensor.copy_((tensor / scale).to(torch.float8_e4m3fn).float() * scale)
                scales[name] = scale
            else:
                tensor.copy_(tensor.to(torch.bfloat16).float())
    return scales


def tiny_tokenizer():
    """Byte-level Qwen2 tokenizer (no merges) with Qwen2.5's special tokens at their real ids."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = bytes_to_unicode()
    vocab = {symbols[b]: b for b in range(256)}
    vocab.update({token: 151643 + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = pack_module("pipelines.qwen_image.loading").CONFIG_DIR / "processor"
    return Qwen2VLImageProcessorPil.from_pretrained(str(config))


def tiny_text_encoder():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]},
                         bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True),
        vision_config=dict(depth=8, hidden_size=80, intermediate_size=48, num_heads=1, in_channels=3,
                           out_hidden_size=128, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7], tokens_per_second=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,  # lm_head (unused by Qwen-Image) shares the embedding: half the file size
    )
    return _materialize(Qwen2_5_VLForConditionalGeneration, config)


def _materialize(cls, config):
    """Build ``cls(config)`` with seeded random weights, skipping transformers' (slow) weight init."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(config)
    generator = torch.Generator().manual_seed(SEED)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if "norm" in name or type(module).__name__.endswith("RMSNorm"):
                value = torch.ones(param.shape)
            else:
                value = torch.randn(param.shape, generator=generator) * 0.05
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    model.tie_weights()
    return model.eval()


def tiny_components() -> dict:
    """Every component, seeded, rounded as the module docstring says (float32 in memory)."""
    offline()
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    loading = pack_module("pipelines.qwen_image.loading")
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER).eval()
    _randomize_(transformer, generator)
    _round_fp8_(transformer, scaled=False)
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKLQwenImage(**TINY_VAE).eval()
    _round_fp8_(vae, scaled=False)  # no 2-D weights: all bf16-rounded
    text_encoder = tiny_text_encoder()
    scales = _round_fp8_(text_encoder, scaled=True)
    with torch.no_grad():  # the embedding is stored in bf16 in every file
        emb = text_encoder.get_input_embeddings().weight
        emb.copy_(emb.to(torch.bfloat16).float())
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(loading.scheduler_config(None))
    tokenizer = tiny_tokenizer()
    processor = pack_module("pipelines.qwen_image.text").make_processor(image_processor(), tokenizer)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                tokenizer=tokenizer, processor=processor, te_scales=scales)


def reference_pipeline(components: dict, variant: str = "plus"):
    """diffusers' QwenImageEditPlusPipeline (or QwenImageEditPipeline) on the tiny components."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    cls = QwenImageEditPlusPipeline if variant == "plus" else QwenImageEditPipeline
    return cls(scheduler=components["scheduler"], vae=components["vae"], text_encoder=components["text_encoder"],
               tokenizer=components["tokenizer"], processor=components["processor"],
               transformer=components["transformer"])


def transformer_2511(components: dict):
    """The tiny transformer configured as Qwen-Image-Edit-2511 (``zero_cond_t``), with the same weights."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(**TINY_TRANSFORMER, zero_cond_t=True).eval()
    model.load_state_dict(components["transformer"].state_dict(), strict=True)
    return model.requires_grad_(False)


# --------------------------------------------------------------------------------------
# File layouts (test-side inverses of what the loaders convert)

ZERO_COND_MARKER = "__index_timestep_zero__"  # ComfyUI's 2511 flag: an empty tensor (model.diffusion_model. prefix)


def fp8mixed_2511(sd: dict) -> tuple[dict, dict]:
    """Comfy-Org's qwen_image_edit_2511_fp8mixed layout: 2-D weights fp8 with a power-of-two ``weight_scale`` and a
    ``comfy_quant`` descriptor, the rest bf16, plus the 2511 marker. Exact: the weights are fp8 values already."""
    out, layers = {}, {}
    for key, tensor in sd.items():
        if tensor.ndim == 2 and key.endswith(".weight") and "embed" not in key:  # as _round_fp8_: embeddings bf16
            layer, scale = key[: -len(".weight")], _pow2_scale(tensor)
            out[key] = (tensor / scale).to(torch.float8_e4m3fn)
            out[layer + ".weight_scale"] = torch.tensor(scale, dtype=torch.float32)
            descriptor = json.dumps({"format": "float8_e4m3fn"}).encode()
            out[layer + ".comfy_quant"] = torch.tensor(list(descriptor), dtype=torch.uint8)
            layers[layer] = {"format": "float8_e4m3fn"}
        else:
            out[key] = tensor.to(torch.bfloat16)
    out[ZERO_COND_MARKER] = torch.zeros(0)
    return out, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


def text_encoder_to_comfy(sd: dict) -> dict:
    """transformers-5 Qwen2.5-VL keys → ComfyUI's (``model.layers.*``, ``visual.*``); lm_head dropped."""
    out = {}
    for key, tensor in sd.items():
        if key.startswith("model.language_model."):
            out["model." + key[len("model.language_model."):]] = tensor
        elif key.startswith("model.visual."):
            out["visual." + key[len("model.visual."):]] = tensor
    return out


def vae_to_wan(sd: dict) -> dict:
    """diffusers AutoencoderKLQwenImage keys → the Wan-2.1 / ComfyUI layout; checked by converting back."""
    convert = pack_module("pipelines.core.diffusers_compat").convert_wan_vae_to_diffusers
    resnet = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
              "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
              "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
    fixed = {"encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1",
             "encoder.norm_out": "encoder.head.0", "encoder.conv_out": "encoder.head.2",
             "decoder.norm_out": "decoder.head.0", "decoder.conv_out": "decoder.head.2",
             "quant_conv": "conv1", "post_quant_conv": "conv2"}
    out = {}
    for key, tensor in sd.items():
        new = None
        for old, wan in fixed.items():
            if key.startswith(old + "."):
                new = wan + key[len(old):]
        parts = key.split(".")
        if new is None and ".mid_block.resnets." in key:
            side, index, rest = parts[0], int(parts[3]), ".".join(parts[4:])
            new = f"{side}.middle.{2 * index}.{resnet[rest]}"
        elif new is None and ".mid_block.attentions.0." in key:
            new = f"{parts[0]}.middle.1." + ".".join(parts[4:])
        elif new is None and key.startswith("encoder.down_blocks."):
            rest = ".".join(parts[3:])
            new = f"encoder.downsamples.{parts[2]}." + resnet.get(rest, rest)
        elif new is None and key.startswith("decoder.up_blocks."):
            block = int(parts[2])
            if parts[3] == "resnets":
                new = f"decoder.upsamples.{block * 4 + int(parts[4])}." + resnet[".".join(parts[5:])]
            else:  # upsamplers.0.<rest>
                new = f"decoder.upsamples.{block * 4 + 3}." + ".".join(parts[5:])
        out[new or key] = tensor
    back = convert(out)
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))[:5]
    return out


def full_width_vae_wan() -> dict[str, torch.Tensor]:
    """A random Qwen-Image VAE of the real architecture, in ComfyUI's Wan-2.1 key layout, bf16.

    ComfyUI 0.3.64's VAELoader recognises a Wan-2.1 VAE by its keys and always builds the real widths
    (``dim`` 96, multipliers 1-2-4-4, 2 residual blocks, 16 latent channels: 127 M parameters), so this is the
    smallest file it accepts. Built on the meta device and filled with small seeded noise (RMS-norm scales at 1),
    quicker than diffusers' initialisation; only its shapes matter, and both VAEs read the same numbers.
    """
    from diffusers import AutoencoderKLQwenImage

    config = {k: v for k, v in json.loads((pack_module("pipelines.qwen_image.loading").CONFIG_DIR / "vae"
                                           / "config.json").read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage(**config)
    generator = torch.Generator().manual_seed(SEED + 7)
    sd = {}
    for name, tensor in vae.state_dict().items():
        if name.endswith("gamma"):
            sd[name] = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            sd[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16)
    return vae_to_wan(sd)


def transformer_to_comfy(sd: dict) -> dict:
    return {f"model.diffusion_model.{k}": v for k, v in sd.items()}


def write_gguf(sd: dict, path: Path, quant: str = "Q8_0", name: str | None = "Qwen-Image-Edit-2509") -> None:
    """``name`` is written as ``general.name`` (None: no name, as some converters leave it)."""
    tiny_files.write_gguf(sd, path, quant, arch="qwen_image", name=name)


def _fp8_file(sd: dict, scales: dict | None) -> dict:
    """2-D ``.weight`` tensors as fp8 (divided by their scale, with ``scale_weight``), the rest bf16."""
    out = {}
    for key, tensor in sd.items():
        if tensor.ndim == 2 and key.endswith(".weight") and "embed" not in key and "lm_head" not in key:
            scale = 1.0 if scales is None else scales[key]
            out[key] = (tensor / scale).to(torch.float8_e4m3fn)
            if scales is not None:
                out[key[: -len(".weight")] + ".scale_weight"] = torch.tensor(scale, dtype=torch.float32)
        else:
            out[key] = tensor.to(torch.bfloat16)
    if scales is not None:
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return out


def write_folder(components: dict, folder: Path) -> None:
    """The diffusers folder, as the published Qwen-Image-Edit-2509 lays it out (weights in bf16)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder"):
        copy.deepcopy(components[name]).to(torch.bfloat16).save_pretrained(str(folder / name))
    components["scheduler"].save_pretrained(str(folder / "scheduler"))
    components["tokenizer"].save_pretrained(str(folder / "tokenizer"))
    components["processor"].save_pretrained(str(folder / "processor"))
    index = {"_class_name": "QwenImageEditPlusPipeline", "_diffusers_version": "0.42.1",
             "processor": ["transformers", "Qwen2VLProcessor"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
             "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "QwenImageTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def make_qwen_image_models(out_dir: str | Path, components: dict | None = None) -> dict[str, Path]:
    """Write the folder and every single file into the models tree ``out_dir``; return the paths by role."""
    components = components or tiny_components()
    out = Path(out_dir)
    paths = {"folder": out / "diffusers" / FOLDER}
    write_folder(components, paths["folder"])
    transformer_sd = components["transformer"].state_dict()
    paths["bf16"] = out / "diffusion_models" / FILES["bf16"]
    _save(transformer_to_comfy(transformer_sd), paths["bf16"], torch.bfloat16)
    paths["fp8"] = out / "diffusion_models" / FILES["fp8"]
    _save(transformer_to_comfy(_fp8_file(transformer_sd, None)), paths["fp8"])
    paths["gguf"] = out / "diffusion_models" / FILES["gguf"]
    write_gguf(transformer_sd, paths["gguf"])
    paths["bf16_2511"] = out / "diffusion_models" / FILES["bf16_2511"]
    _save(transformer_to_comfy({**transformer_sd, ZERO_COND_MARKER: torch.zeros(0)}), paths["bf16_2511"],
          torch.bfloat16)
    paths["fp8mixed_2511"] = out / "diffusion_models" / FILES["fp8mixed_2511"]
    mixed, metadata = fp8mixed_2511(transformer_sd)
    _save(transformer_to_comfy(mixed), paths["fp8mixed_2511"], metadata=metadata)
    paths["gguf_2511"] = out / "diffusion_models" / FILES["gguf_2511"]
    write_gguf(transformer_sd, paths["gguf_2511"], name=None)  # no marker, no title: only the name says 2511
    paths["vae"] = out / "vae" / FILES["vae"]
    _save(vae_to_wan(components["vae"].state_dict()), paths["vae"], torch.bfloat16)
    te_sd = components["text_encoder"].state_dict()
    paths["te_bf16"] = out / "text_encoders" / FILES["te_bf16"]
    _save(text_encoder_to_comfy(te_sd), paths["te_bf16"], torch.bfloat16)
    paths["te_fp8"] = out / "text_encoders" / FILES["te_fp8"]
    scales = {k: v for k, v in components["te_scales"].items()}
    _save(_fp8_file(text_encoder_to_comfy(te_sd), {_comfy_key(k): v for k, v in scales.items()}), paths["te_fp8"])
    return paths


def _comfy_key(key: str) -> str:
    return next(iter(text_encoder_to_comfy({key: None}))) if key.startswith(("model.language_model.", "model.visual.")) \
        else key


def main(argv=None) -> int:
    return tiny_files.main(make_qwen_image_models, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())


# --------------------------------------------------------------------------------------
# pytest fixtures shared by tests/test_qwen_image_*.py (imported there)

_TREE: dict = {}


def qwen_tree(tmp_root: Path) -> dict:
    """Components and written files, built once per process (the Qwen test modules share them)."""
    return tiny_files.cached_tree(_TREE, tmp_root, tiny_components, lambda root, built: make_qwen_image_models(root, built))
