"""Qwen-Image-Layered: the folder, ComfyUI's bf16 and fp8mixed files, GGUF, the RGBA VAE, Qwen2.5-VL with and
without its language-model head, and diffusers' reference pipeline.

What differs from Qwen-Image-Edit's tiny models (whose configs, tokenizer and key layouts are reused): the
transformer has the Layered switches (``use_additional_t_cond``, ``use_layer3d_rope``), the VAE reads and writes 4
channels (RGBA), and the text encoder's language-model head is a separate weight (as in the real Qwen2.5-VL-7B,
``tie_word_embeddings: false``), because Qwen-Image-Layered captions pictures with it. The head's rows outside the
tiny tokenizer's vocabulary are zero, and the two end tokens' rows are aimed so that the random model writes a
short caption in either language and then stops (captioning runs up to 512 tokens otherwise; see ``_aim_eos_``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import qwen_image as qi
from .core import BF16, Family, File, Folder, Part, comfy_keys, fp8, gguf, pack_module

FOLDER = "Qwen-Image-Layered"
EOS = 151645  # <|im_end|>
# The workflow test shrinks the decomposition (the shipped 640-pixel bucket would take minutes on a CPU).
TINY_TREE_INPUTS = {"EditKitQwenImageLayered": {"resolution": 64}}
TEXT_ENCODER = dict(qi.TEXT_ENCODER, tie_word_embeddings=False,
                    text_config=dict(qi.TEXT_ENCODER["text_config"], tie_word_embeddings=False))


def _known_rows_only(model) -> None:
    """The head's rows outside the tiny tokenizer's vocabulary are zero; the end tokens' are aimed by _aim_eos_."""
    keep = torch.zeros(qi.VOCAB, dtype=torch.bool)
    keep[torch.tensor(sorted(qi.tiny_tokenizer().get_vocab().values()))] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0
        model.lm_head.weight[[EOS, 151643]] = 0.0


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

    with torch.no_grad():
        for language, token in stops.items():
            runs = []
            for picture in pictures:
                batch = processor(text=[prompts[language]], images=[picture], return_tensors="pt")
                start = batch["input_ids"].shape[1]
                run = model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=list(stops.values()),
                                     pad_token_id=151643, repetition_penalty=penalty, output_scores=True,
                                     return_dict_in_generate=True)
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


def _finish(components: dict) -> None:
    """Aim the end tokens, round the head again, and greedy generation settings (Qwen2.5-VL-7B-Instruct's, as its
    top_k 1)."""
    model = components["text_encoder"]
    _aim_eos_(model, components["processor"])
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight.to(BF16).float())
    generation = model.generation_config
    generation.bos_token_id, generation.pad_token_id, generation.eos_token_id = 151643, 151643, [EOS, 151643]
    generation.repetition_penalty, generation.do_sample = 1.05, False


FAMILY = Family(
    "qwen_layered", "qwen_layered",
    parts={
        "transformer": Part("transformer", dict(qi.TINY_TRANSFORMER, use_additional_t_cond=True, use_layer3d_rope=True),
                            seed=qi.SEED + 7, randomize=qi.SEED + 7, precision="fp8_scaled"),
        "vae": Part("vae", dict(qi.TINY_VAE, input_channels=4), seed=qi.SEED + 8, precision="fp8"),
        "text_encoder": Part("Qwen2_5_VLForConditionalGeneration", TEXT_ENCODER, noise=(qi.SEED, 0.05),
                             adjust=_known_rows_only),
    },
    extras=qi.text_extras,
    finish=_finish,
    folders=(Folder(FOLDER, "QwenImageLayeredPipeline", dtype=BF16, index=qi.PROCESSOR_INDEX),),
    files={
        "bf16": File("diffusion_models/qwen_image_layered_bf16.safetensors", "transformer", comfy_keys),
        "fp8mixed": File("diffusion_models/qwen_image_layered_fp8mixed.safetensors", "transformer", comfy_keys,
                         fp8("mixed")),
        "gguf": File("diffusion_models/Qwen-Image-Layered-Q8_0.gguf", "transformer", None, gguf("qwen_image", FOLDER)),
        "vae": File("vae/qwen_image_layered_vae.safetensors", "vae", qi.vae_to_wan),
        "te_head": File("text_encoders/qwen_2.5_vl_7b_with_head.safetensors", "text_encoder",
                        qi.text_encoder_keys(head=True)),
        "te_no_head": File("text_encoders/qwen_2.5_vl_7b_no_head.safetensors", "text_encoder", qi.text_encoder_keys()),
    },
)

FILES = {role: Path(file.path).name for role, file in FAMILY.files.items()}


def reference_pipeline(components: dict):
    """diffusers' QwenImageLayeredPipeline on the tiny components."""
    return FAMILY.pipeline(components, "QwenImageLayeredPipeline")
