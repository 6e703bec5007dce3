"""Tiny random Qwen-Image-Layered models in the real file formats, and diffusers' reference pipeline.

    python tests/qwen_layered_models.py OUT_DIR     # writes the files below into a models tree

    diffusers/Qwen-Image-Layered/                          full diffusers folder (QwenImageLayeredPipeline)
    diffusion_models/qwen_image_layered_bf16.safetensors   ComfyUI layout (model.diffusion_model.*), bf16
    diffusion_models/qwen_image_layered_fp8mixed.safetensors  ComfyUI's mixed fp8: 2-D weights float8_e4m3fn
                                                           with a per-tensor ``weight_scale``, the rest bf16
    diffusion_models/Qwen-Image-Layered-Q8_0.gguf          GGUF Q8_0 (city96 layout: no prefix)
    vae/qwen_image_layered_vae.safetensors                 the RGBA VAE in ComfyUI's Wan-VAE key layout, bf16
    text_encoders/qwen_2.5_vl_7b_with_head.safetensors     Qwen2.5-VL in ComfyUI's layout plus ``lm_head.weight``
    text_encoders/qwen_2.5_vl_7b_no_head.safetensors       the same without the language-model head

What differs from the Qwen-Image-Edit tiny models (``qwen_image_models``, whose helpers are reused): the
transformer has the Layered switches (``use_additional_t_cond``, ``use_layer3d_rope``), the VAE reads and
writes 4 channels (RGBA), and the text encoder's language-model head is a separate weight (as in the real
Qwen2.5-VL-7B, ``tie_word_embeddings: false``), because Qwen-Image-Layered captions pictures with it. The
head's rows outside the tiny tokenizer's vocabulary are zero, and the two end tokens' rows are aimed so that
the random model writes a short caption in either language and then stops (captioning runs up to 512
tokens otherwise; see ``_aim_eos_``). Weights are rounded so that every file holds them exactly (fp8 values
times a power of two for the transformer's 2-D weights, bf16 for the rest).
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
from qwen_image_models import (  # noqa: E402
    SEED,
    TINY_TRANSFORMER,
    TINY_VAE,
    VOCAB,
    _materialize,
    _randomize_,
    _round_fp8_,
    _save,
    image_processor,
    tiny_tokenizer,
    transformer_to_comfy,
    vae_to_wan,
    write_gguf,
)

from packload import offline, pack_module  # noqa: E402

FOLDER = "Qwen-Image-Layered"
LAYERED_SWITCHES = dict(use_additional_t_cond=True, use_layer3d_rope=True)
TINY_LAYERED_TRANSFORMER = dict(TINY_TRANSFORMER, **LAYERED_SWITCHES)
TINY_RGBA_VAE = dict(TINY_VAE, input_channels=4)
EOS = 151645  # <|im_end|>
FILES = {
    "bf16": "qwen_image_layered_bf16.safetensors",
    "fp8mixed": "qwen_image_layered_fp8mixed.safetensors",
    "gguf": "Qwen-Image-Layered-Q8_0.gguf",
    "vae": "qwen_image_layered_vae.safetensors",
    "te_head": "qwen_2.5_vl_7b_with_head.safetensors",
    "te_no_head": "qwen_2.5_vl_7b_no_head.safetensors",
}
# The workflow test shrinks the decomposition (the shipped 640-pixel bucket would take minutes on a CPU).
TINY_TREE_INPUTS = {"EditKitQwenImageLayered": {"resolution": 64}}


def tiny_captioning_text_encoder():
    """Qwen2.5-VL with an untied language-model head (the real 7B's layout)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]},
                         bos_token_id=151643, eos_token_id=EOS, tie_word_embeddings=False),
        vision_config=dict(depth=8, hidden_size=80, intermediate_size=48, num_heads=1, in_channels=3,
                           out_hidden_size=128, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7], tokens_per_second=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )
    model = _materialize(Qwen2_5_VLForConditionalGeneration, config)
    known = torch.tensor(sorted(tiny_tokenizer().get_vocab().values()))
    with torch.no_grad():
        head = model.lm_head.weight
        keep = torch.zeros(VOCAB, dtype=torch.bool)
        keep[known] = True
        head[~keep] = 0.0
        head[[EOS, 151643]] = 0.0  # the end tokens: aimed by _aim_eos_
    return model


def _aim_eos_(model, processor) -> None:
    """Make the tiny model end its captions after a few tokens, in both caption languages.

    Qwen2.5-VL stops at either end token (``<|im_end|>``, ``<|endoftext|>``); each gets a head row along the
    mean hidden state that predicts the tokens the model writes with one caption prompt (English, Chinese),
    over a few fixed pictures. Until an end token wins, greedy decoding writes the same tokens whatever that
    row's length, so the length at which the end token would outscore the written token at each step is
    computed from one run's scores per picture (after the repetition penalty, which also divides
    ``<|im_end|>``'s logit: the prompt holds it), and set so that no caption stops before 2 tokens and every
    one stops by 16. A fixed function of the tiny weights: no randomness.
    """
    import numpy as np
    from PIL import Image

    prompts = pack_module("pipelines.qwen_image.layered_text").CAPTION_PROMPTS
    rng = np.random.default_rng(0)
    pictures = [Image.new("RGB", (56, 56), (120, 80, 40))] + [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((64, 48), (48, 64), (80, 48))]
    stops = {"en": EOS, "zh": 151643}
    penalty = 1.05

    def write(batch, tokens, **kwargs):
        return model.generate(**batch, max_new_tokens=tokens, do_sample=False, eos_token_id=list(stops.values()),
                              pad_token_id=151643, repetition_penalty=penalty, **kwargs)

    with torch.no_grad():
        for language, token in stops.items():
            batches = [processor(text=[prompts[language]], images=[p], return_tensors="pt") for p in pictures]
            runs = []
            for batch in batches:
                start = batch["input_ids"].shape[1]
                run = write(batch, 16, output_scores=True, return_dict_in_generate=True)
                hidden = model.model(input_ids=run.sequences, pixel_values=batch["pixel_values"],
                                     image_grid_thw=batch["image_grid_thw"]).last_hidden_state[0]
                written = torch.stack(run.scores)[:, 0].max(-1).values
                divide = penalty if bool((batch["input_ids"] == token).any()) else 1.0
                runs.append((hidden[start - 1: start - 1 + len(written)], written * divide))
            direction = torch.cat([h for h, _ in runs]).mean(0)
            direction = direction / direction.norm()
            early, late = float("inf"), 0.0
            for hidden, written in runs:
                along = hidden @ direction
                needed = torch.where(along > 0, written.clamp(min=0) / along, torch.full_like(along, 1e9))
                early, late = min(early, float(needed[:2].min())), max(late, float(needed[2:].min()))
            if late >= early:
                raise RuntimeError(f"the tiny model's {language} captions cannot be made to stop after 2 tokens")
            model.lm_head.weight[token] = direction * (early * late) ** 0.5


def tiny_components() -> dict:
    """Every component, seeded and rounded as the module docstring says (float32 in memory)."""
    offline()
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    loading = pack_module("pipelines.qwen_image.loading")
    text = pack_module("pipelines.qwen_image.text")
    generator = torch.Generator().manual_seed(SEED + 7)
    torch.manual_seed(SEED + 7)
    transformer = QwenImageTransformer2DModel(**TINY_LAYERED_TRANSFORMER).eval()
    _randomize_(transformer, generator)
    scales = _round_fp8_(transformer, scaled=True)
    torch.manual_seed(SEED + 8)
    vae = AutoencoderKLQwenImage(**TINY_RGBA_VAE).eval()
    _round_fp8_(vae, scaled=False)  # no 2-D weights: all bf16-rounded
    text_encoder = tiny_captioning_text_encoder()
    with torch.no_grad():
        for tensor in text_encoder.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).float())
    tokenizer = tiny_tokenizer()
    processor = text.make_processor(image_processor(), tokenizer)
    _aim_eos_(text_encoder, processor)
    with torch.no_grad():
        text_encoder.lm_head.weight.copy_(text_encoder.lm_head.weight.to(torch.bfloat16).float())
    generation = text_encoder.generation_config  # Qwen2.5-VL-7B-Instruct's settings, greedy (as its top_k 1)
    generation.bos_token_id, generation.pad_token_id, generation.eos_token_id = 151643, 151643, [EOS, 151643]
    generation.repetition_penalty, generation.do_sample = 1.05, False
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(loading.scheduler_config(None))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                tokenizer=tokenizer, processor=processor, transformer_scales=scales)


def reference_pipeline(components: dict):
    """diffusers' QwenImageLayeredPipeline on the tiny components."""
    from diffusers import QwenImageLayeredPipeline

    return QwenImageLayeredPipeline(scheduler=components["scheduler"], vae=components["vae"],
                                    text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
                                    processor=components["processor"], transformer=components["transformer"])


# --------------------------------------------------------------------------------------
# Files


def text_encoder_to_comfy(sd: dict, head: bool) -> dict:
    """transformers-5 keys → ComfyUI's (``model.layers.*``, ``visual.*``), with or without ``lm_head.weight``."""
    out = {}
    for key, tensor in sd.items():
        if key.startswith("model.language_model."):
            out["model." + key[len("model.language_model."):]] = tensor
        elif key.startswith("model.visual."):
            out["visual." + key[len("model.visual."):]] = tensor
        elif key == "lm_head.weight" and head:
            out[key] = tensor
    return out


def fp8mixed_file(sd: dict, scales: dict) -> tuple[dict, dict]:
    """ComfyUI's mixed-precision layout: quantized layers' weights in fp8 with ``weight_scale``, the rest bf16."""
    out, layers = {}, {}
    for key, tensor in sd.items():
        if key in scales:
            out[key] = (tensor / scales[key]).to(torch.float8_e4m3fn)
            out[key[: -len(".weight")] + ".weight_scale"] = torch.tensor(scales[key], dtype=torch.float32)
            layers[key[: -len(".weight")]] = {"format": "float8_e4m3fn"}
        else:
            out[key] = tensor.to(torch.bfloat16)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    return out, metadata


def write_folder(components: dict, folder: Path) -> None:
    """The diffusers folder, laid out as the published Qwen/Qwen-Image-Layered (weights in bf16)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder"):
        copy.deepcopy(components[name]).to(torch.bfloat16).save_pretrained(str(folder / name))
    components["scheduler"].save_pretrained(str(folder / "scheduler"))
    components["tokenizer"].save_pretrained(str(folder / "tokenizer"))
    components["processor"].save_pretrained(str(folder / "processor"))
    index = {"_class_name": "QwenImageLayeredPipeline", "_diffusers_version": "0.42.1",
             "processor": ["transformers", "Qwen2VLProcessor"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
             "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "QwenImageTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def make_qwen_layered_models(out_dir: str | Path, components: dict | None = None,
                             single_files: bool = True) -> dict[str, Path]:
    """Write the folder (and, unless ``single_files`` is off, every single file) into the models tree ``out_dir``."""
    components = components or tiny_components()
    out = Path(out_dir)
    paths = {"folder": out / "diffusers" / FOLDER}
    write_folder(components, paths["folder"])
    if not single_files:
        return paths
    transformer_sd = components["transformer"].state_dict()
    paths["bf16"] = out / "diffusion_models" / FILES["bf16"]
    _save(transformer_to_comfy(transformer_sd), paths["bf16"], torch.bfloat16)
    paths["fp8mixed"] = out / "diffusion_models" / FILES["fp8mixed"]
    mixed, metadata = fp8mixed_file(transformer_sd, components["transformer_scales"])
    _save(transformer_to_comfy(mixed), paths["fp8mixed"], metadata=metadata)
    paths["gguf"] = out / "diffusion_models" / FILES["gguf"]
    write_gguf(transformer_sd, paths["gguf"])
    paths["vae"] = out / "vae" / FILES["vae"]
    _save(vae_to_wan(components["vae"].state_dict()), paths["vae"], torch.bfloat16)
    te_sd = components["text_encoder"].state_dict()
    for role, head in (("te_head", True), ("te_no_head", False)):
        paths[role] = out / "text_encoders" / FILES[role]
        _save(text_encoder_to_comfy(te_sd, head), paths[role], torch.bfloat16)
    return paths


def main(argv=None) -> int:
    return tiny_files.main(make_qwen_layered_models, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())


_TREE: dict = {}


def layered_tree(tmp_root: Path) -> dict:
    """Components and written files, built once per process."""
    return tiny_files.cached_tree(_TREE, tmp_root, tiny_components, lambda root, built: make_qwen_layered_models(root, built))
