"""FLUX.1's text encoders (CLIP-L for the pooled vector, T5-XXL for the token states).

Prompts are encoded exactly as diffusers' Flux pipelines do (CLIP padded to 77 tokens, T5 to
``max_sequence_length``), and the results are cached per prompt on the encoder object, so
multi-round edits and re-runs with the same prompt cost nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..core.errors import EditKitError, ModelFileError
from ..core.loading import LazyModel, file_key, folder_key, read_state_dict, unavailable
from ..core.precision import Precision, apply_precision
from ..core.runtime import Component, Runtime
from ..core.transformers_loading import from_state_dict
from .loading import CLIP_EXPECTED, CONFIG_DIR, T5_EXPECTED, count_blocks

DEFAULT_T5_LENGTH = 512
_CACHE_SIZE = 64


class FluxTextEncoders:
    """CLIP-L + T5-XXL with their tokenizers and a small per-prompt cache (CPU tensors)."""

    def __init__(self, clip: Component, t5: Component, clip_tokenizer, t5_tokenizer):
        self.clip = clip
        self.t5 = t5
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, prompts: list[str], runtime: Runtime, max_sequence_length: int = DEFAULT_T5_LENGTH):
        """T5 states ``[B,T,D]`` and CLIP pooled ``[B,P]`` (float32, CPU) for ``prompts``."""
        states, pooled = [], []
        for prompt in prompts:
            key = (prompt, max_sequence_length)
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is None:
                hit = self._encode_one(prompt, runtime, max_sequence_length)
                with self._lock:
                    self._cache[key] = hit
                    while len(self._cache) > _CACHE_SIZE:
                        self._cache.popitem(last=False)
            states.append(hit[0])
            pooled.append(hit[1])
        return torch.cat(states), torch.cat(pooled)

    @torch.inference_mode()
    def _encode_one(self, prompt: str, runtime: Runtime, max_sequence_length: int):
        clip_ids = self.clip_tokenizer(
            [prompt], padding="max_length", max_length=self.clip_tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        device = runtime.acquire(self.clip)
        pooled = self.clip.module(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(
            [prompt], padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        device = runtime.acquire(self.t5)
        states = self.t5.module(t5_ids.to(device), output_hidden_states=False)[0]
        return states.float().cpu(), pooled.float().cpu()


# --------------------------------------------------------------------------------------
# Loading


def _tokenizers(folder: Path | None, clip_dir: Path | None, t5_dir: Path | None):
    from transformers import CLIPTokenizer, T5TokenizerFast

    if folder is not None and (folder / "tokenizer").is_dir():
        clip_dir = folder / "tokenizer"
    if folder is not None and (folder / "tokenizer_2").is_dir():
        t5_dir = folder / "tokenizer_2"
    if clip_dir is None or t5_dir is None:
        raise EditKitError(
            "No tokenizer files for the FLUX.1 text encoders. Pick a diffusers FLUX.1 folder in the loader (its "
            "tokenizer/ and tokenizer_2/ are used), or run inside ComfyUI, whose bundled tokenizers are used "
            "with single-file text encoders."
        )
    try:
        clip_tok = CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
        t5_tok = T5TokenizerFast.from_pretrained(str(t5_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EditKitError(
            f"Cannot read the tokenizer files in '{clip_dir}' / '{t5_dir}': {exc}. The diffusers folder needs "
            "tokenizer/ and tokenizer_2/ as published with FLUX.1 (re-download them), or pick (none) as folder "
            "inside ComfyUI to use its bundled tokenizers."
        ) from exc
    return clip_tok, t5_tok


def _clip_from_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    raw = read_state_dict(path, CLIP_EXPECTED)  # fp8 stays fp8: core.transformers_loading
    # ComfyUI's clip_l.safetensors (and transformers 4) prefix keys with "text_model."; transformers 5 does not.
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in raw.items()}
    if "embeddings.token_embedding.weight" not in sd or "encoder.layers.0.mlp.fc1.weight" not in sd:
        sample = ", ".join(list(raw)[:3]) or "no tensors"
        raise ModelFileError(path, f"Not a CLIP text encoder (found keys like {sample})", CLIP_EXPECTED)
    vocab, hidden = sd["embeddings.token_embedding.weight"].shape
    config = CLIPTextConfig.from_pretrained(str(CONFIG_DIR / "clip_l"))
    config.vocab_size = vocab
    config.hidden_size = hidden
    config.max_position_embeddings = sd["embeddings.position_embedding.weight"].shape[0]
    config.num_hidden_layers = count_blocks(sd, "encoder.layers.")
    config.intermediate_size = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    config.num_attention_heads = max(1, hidden // 64)  # CLIP-L's heads are 64 wide; shapes cannot tell
    with torch.device("meta"):
        prefixed = any(k.startswith("text_model.") for k in CLIPTextModel(config).state_dict())
    if prefixed:
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return from_state_dict(CLIPTextModel, config, sd, dtype, path, CLIP_EXPECTED)


def _t5_from_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    sd = read_state_dict(path, T5_EXPECTED)  # fp8 stays fp8: core.transformers_loading
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.setdefault("encoder.embed_tokens.weight", sd.get("shared.weight"))
    bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if sd.get("shared.weight") is None or bias_key not in sd:
        sample = ", ".join(k for k in list(sd)[:3] if sd[k] is not None) or "no tensors"
        raise ModelFileError(path, f"Not a T5 encoder (found keys like {sample})", T5_EXPECTED)
    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd[bias_key].shape
    config = T5Config.from_pretrained(str(CONFIG_DIR / "t5_xxl"))
    config.vocab_size = vocab
    config.d_model = d_model
    config.num_heads = heads
    config.relative_attention_num_buckets = buckets
    config.d_kv = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads
    config.num_layers = count_blocks(sd, "encoder.block.")
    config.d_ff = sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"].shape[1]
    # transformers ties shared / encoder.embed_tokens and keeps _keep_in_fp32_modules (wo) in fp32 for fp16
    return from_state_dict(T5EncoderModel, config, {k: v for k, v in sd.items() if v is not None}, dtype, path,
                           T5_EXPECTED)


def _text_encoders(folder, clip_file, t5_file, clip_tok_dir, t5_tok_dir, dtype, storage=None) -> FluxTextEncoders:
    """CLIP-L + T5-XXL computing in ``dtype``, their weights stored in ``storage`` (default ``dtype``)."""
    from transformers import CLIPTextModel, T5EncoderModel

    precision = Precision(storage or dtype, dtype)
    dtype = precision.storage  # what the files are read into; apply_precision sets the compute dtype below
    clip_tok, t5_tok = _tokenizers(folder, clip_tok_dir, t5_tok_dir)
    for name, file in (("text_encoder", clip_file), ("text_encoder_2", t5_file)):
        if file is None and not (folder / name / "config.json").is_file():
            raise ModelFileError(folder / name, "No text encoder in this diffusers folder", f"a '{name}' sub-folder")
    if clip_file is not None:
        clip = _clip_from_file(clip_file, dtype)
        clip_name = clip_file.name
    else:
        clip = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=dtype, local_files_only=True)
        clip_name = f"{folder.name}/text_encoder"
    if t5_file is not None:
        t5 = _t5_from_file(t5_file, dtype)
        t5_name = t5_file.name
    else:
        t5 = T5EncoderModel.from_pretrained(str(folder / "text_encoder_2"), torch_dtype=dtype, local_files_only=True)
        t5_name = f"{folder.name}/text_encoder_2"
    clip.eval().requires_grad_(False)
    t5.eval().requires_grad_(False)
    if precision.casts:
        apply_precision(clip, precision)
        apply_precision(t5, precision)
    dtype = precision.compute
    if clip_tok.model_max_length > clip.config.max_position_embeddings:
        clip_tok.model_max_length = clip.config.max_position_embeddings
    return FluxTextEncoders(
        Component(clip, "text_encoder", clip_name, dtype), Component(t5, "text_encoder", t5_name, dtype), clip_tok, t5_tok
    )


def text_encoder_source(
    folder: Path | None,
    clip_file: Path | None,
    t5_file: Path | None,
    dtype: torch.dtype,
    clip_tokenizer_dir: Path | None = None,
    t5_tokenizer_dir: Path | None = None,
    storage: torch.dtype | None = None,
) -> LazyModel:
    """Lazily loaded CLIP-L + T5-XXL: single files where given, else the folder's components.

    ``dtype`` is the compute dtype; weights are stored in ``storage`` (default: ``dtype``).
    """
    storage = None if storage == dtype else storage
    if folder is None and (clip_file is None or t5_file is None):
        return unavailable("FLUX.1 text encoders", "No text encoders: pick a diffusers folder, or both a CLIP-L and "
                           "a T5-XXL file, in EditKit · Flux Loader.")
    key = ("text", folder_key(folder) if clip_file is None or t5_file is None else None, file_key(clip_file), file_key(t5_file), str(clip_tokenizer_dir),
           str(t5_tokenizer_dir), dtype, storage)
    return LazyModel(key, lambda: _text_encoders(folder, clip_file, t5_file, clip_tokenizer_dir, t5_tokenizer_dir,
                                                 dtype, storage), "FLUX.1 text encoders")
