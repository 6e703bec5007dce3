"""Z-Image's text encoder (Qwen3-4B), its tokenizer and chat format, and its CONDITIONING.

A prompt is wrapped in Qwen3's chat format exactly as diffusers' ``ZImagePipeline`` does
(``apply_chat_template`` with ``add_generation_prompt=True, enable_thinking=True``), tokenized
(at most 512 tokens) and encoded; the states of the second-to-last layer are the caption
features. diffusers pads every prompt to 512 tokens and then drops the padding; Qwen3 is causal
and padding goes on the right, so encoding only the real tokens gives the same features at a
fraction of the cost. Encodings are cached per prompt on the encoder object.

CONDITIONING follows ComfyUI's list-of-pairs convention: ``[[states [1,T,D], {}]]`` with the
prompt's real tokens only (an ``attention_mask`` in the dict, as other text encoders write it,
is honoured when reading).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..core.errors import EditKitError, ModelFileError
from ..core.loading import LazyModel, file_key, folder_key, read_state_dict, unavailable
from ..core.runtime import Component, Runtime
from ..core.transformers_loading import from_state_dict
from ..flux.loading import count_blocks
from .loading import CONFIG_DIR

log = logging.getLogger("EditKit")

MAX_SEQUENCE_LENGTH = 512
_CACHE_SIZE = 64
QWEN3_EXPECTED = "the Qwen3-4B text encoder of Z-Image (qwen_3_4b.safetensors, keys like 'model.layers.0.self_attn.q_norm.weight')"


def chat_template() -> str:
    """Qwen3's chat format (shipped), for tokenizer files that carry another one (ComfyUI's Qwen2.5 files)."""
    with open(CONFIG_DIR / "qwen3_tokenizer" / "chat_template.json", encoding="utf-8") as handle:
        return json.load(handle)["chat_template"]


class ZImageTextEncoder:
    """Qwen3 with its tokenizer and a small per-prompt cache (CPU float32 tensors)."""

    cache_size = _CACHE_SIZE

    def __init__(self, encoder: Component, tokenizer, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def width(self) -> int:
        return int(self.encoder.module.config.hidden_size)

    def encode(self, prompt: str, runtime: Runtime) -> torch.Tensor:
        """Caption features ``[T, D]`` (float32, CPU) of one prompt."""
        with self._lock:
            hit = self._cache.get(prompt)
            if hit is not None:
                self._cache.move_to_end(prompt)
                return hit
        hit = self._encode_one(prompt, runtime)
        with self._lock:
            self._cache[prompt] = hit
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return hit

    def token_ids(self, prompt: str) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        return self.tokenizer(
            [text], truncation=True, max_length=self.max_sequence_length, return_tensors="pt"
        ).input_ids

    @torch.inference_mode()
    def _encode_one(self, prompt: str, runtime: Runtime) -> torch.Tensor:
        ids = self.token_ids(prompt)
        device = runtime.acquire(self.encoder)
        ids = ids.to(device)
        out = self.encoder.module(
            input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
        ).hidden_states[-2]
        return out[0].float().cpu()


# --------------------------------------------------------------------------------------
# CONDITIONING


def make_conditioning(states: torch.Tensor) -> list:
    """``[T, D]`` caption features → ComfyUI CONDITIONING ``[[states [1,T,D], {}]]``."""
    return [[states.unsqueeze(0), {}]]


def read_conditioning(conditioning, width: int, what: str = "positive") -> list[torch.Tensor]:
    """A Z-Image CONDITIONING → one ``[T, D]`` tensor per prompt, with a clear error for foreign ones."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise EditKitError(f"The {what} CONDITIONING is empty. Connect EditKit · Z-Image Text Encode.")
    if len(conditioning) > 1:
        log.warning("EditKit: the %s CONDITIONING has %d entries; Z-Image uses the first one.", what, len(conditioning))
    states, extra = conditioning[0][0], conditioning[0][1]
    if not torch.is_tensor(states) or states.ndim != 3:
        raise EditKitError(
            f"The {what} CONDITIONING does not hold text states [batch, tokens, width]. Encode the prompt with "
            "EditKit · Z-Image Text Encode."
        )
    if states.shape[-1] != width:
        hint = " (that is FLUX.1's T5-XXL)" if states.shape[-1] == 4096 else ""
        raise EditKitError(
            f"The {what} prompt was encoded to width {states.shape[-1]}{hint}, but this Z-Image transformer reads "
            f"{width}-wide Qwen3 features. Encode it with EditKit · Z-Image Text Encode (Qwen3-4B, "
            "qwen_3_4b.safetensors)."
        )
    mask = extra.get("attention_mask") if isinstance(extra, dict) else None
    out = []
    for i in range(states.shape[0]):
        row = states[i]
        if mask is not None and torch.is_tensor(mask) and mask.shape[-1] == states.shape[1]:
            row = row[mask[min(i, mask.shape[0] - 1)].bool()]
        out.append(row)
    return out


def expand_prompts(prompts: list[torch.Tensor], total: int, what: str = "positive") -> list[torch.Tensor]:
    """Match a list of prompts to ``total`` samples: one prompt for all, or one per sample group."""
    if len(prompts) == total:
        return prompts
    if len(prompts) == 1:
        return prompts * total
    if total % len(prompts) == 0:
        per = total // len(prompts)
        return [p for p in prompts for _ in range(per)]
    raise EditKitError(f"The {what} CONDITIONING holds {len(prompts)} prompts for {total} pictures. "
                       "Give one prompt, or one per picture.")


# --------------------------------------------------------------------------------------
# Loading


def _tokenizer(folder: Path | None, comfy_dir: Path | None):
    from transformers import AutoTokenizer

    template = None
    if folder is not None and (folder / "tokenizer").is_dir():
        source = folder / "tokenizer"
    elif comfy_dir is not None:
        source, template = comfy_dir, chat_template()  # ComfyUI's files carry Qwen2.5's template
    else:
        raise EditKitError(
            "No tokenizer for the Qwen3 text encoder. Pick the Z-Image-Turbo diffusers folder in the loader (its "
            "tokenizer/ is used), or run inside ComfyUI, whose bundled Qwen tokenizer files are used with "
            "qwen_3_4b.safetensors. Outside ComfyUI, pass the folder of those files (ComfyUI/comfy/text_encoders/"
            "qwen25_tokenizer) as tokenizer_dir."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EditKitError(f"Cannot read the tokenizer files in '{source}': {exc}. Re-download the Z-Image-Turbo "
                           "tokenizer/ folder (vocab.json, merges.txt, tokenizer_config.json).") from exc
    if template is not None or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template or chat_template()
    tokenizer.padding_side = "right"
    return tokenizer


def _foreign_encoder(sd: dict) -> str | None:
    if "shared.weight" in sd or any(k.startswith("encoder.block.") for k in sd):
        return "a T5 text encoder (FLUX.1's t5xxl)"
    if any(k.startswith(("text_model.", "embeddings.token_embedding")) for k in sd):
        return "a CLIP text encoder (clip_l)"
    if any(k.startswith("visual.") for k in sd):
        return "a Qwen2.5-VL text encoder (Qwen-Image's)"
    return None


def _qwen3_from_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """Qwen3 from a single file: config from the shapes, then transformers' own loader (fp32 rotary)."""
    from transformers import Qwen3Config, Qwen3Model

    raw = read_state_dict(path, QWEN3_EXPECTED)
    foreign = _foreign_encoder(raw)
    if foreign is not None:
        raise ModelFileError(path, f"This is {foreign}; Z-Image needs Qwen3-4B", QWEN3_EXPECTED)
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in raw.items() if not k.startswith("lm_head.")}
    if "embed_tokens.weight" not in sd or "layers.0.self_attn.q_norm.weight" not in sd:
        sample = ", ".join(list(raw)[:3]) or "no tensors"
        raise ModelFileError(path, f"Not a Qwen3 text encoder (found keys like {sample})", QWEN3_EXPECTED)
    vocab, hidden = sd["embed_tokens.weight"].shape
    head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0]
    config = Qwen3Config.from_pretrained(str(CONFIG_DIR / "qwen3_4b"))
    config.vocab_size = vocab
    config.hidden_size = hidden
    config.head_dim = head_dim
    config.num_attention_heads = sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim
    config.num_key_value_heads = sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim
    config.intermediate_size = sd["layers.0.mlp.gate_proj.weight"].shape[0]
    config.num_hidden_layers = count_blocks(sd, "layers.")
    config.max_window_layers = config.num_hidden_layers
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    return from_state_dict(Qwen3Model, config, sd, dtype, path, QWEN3_EXPECTED)


def _text_encoder(folder: Path | None, file: Path | None, comfy_tokenizer_dir: Path | None,
                  dtype: torch.dtype, wrapper: type = ZImageTextEncoder) -> ZImageTextEncoder:
    from transformers import Qwen3Model

    tokenizer = _tokenizer(folder, comfy_tokenizer_dir)
    if file is not None:
        model = _qwen3_from_file(file, dtype)
        name = file.name
    else:
        sub = folder / "text_encoder"
        if not (sub / "config.json").is_file():
            raise ModelFileError(sub, "No text encoder in this diffusers folder", "a 'text_encoder' sub-folder")
        try:
            model = Qwen3Model.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelFileError(sub, f"Cannot load the text encoder ({exc})", QWEN3_EXPECTED) from exc
        name = f"{folder.name}/text_encoder"
    model.eval().requires_grad_(False)
    return wrapper(Component(model, "text_encoder", name, dtype), tokenizer)


def text_encoder_source(folder: Path | None, file: Path | None, dtype: torch.dtype,
                        comfy_tokenizer_dir: Path | None = None, wrapper: type = ZImageTextEncoder) -> LazyModel:
    """Lazily loaded Qwen3 text encoder: the single file if given, else the folder's ``text_encoder``.

    ``wrapper`` is the class that turns prompts into features (FLUX.2 [klein] reads the same Qwen3 files
    with its own recipe: ``pipelines.flux2.text``).
    """
    if folder is None and file is None:
        return unavailable("Z-Image text encoder", "No text encoder: pick a diffusers folder or the Qwen3-4B file "
                           "(qwen_3_4b.safetensors) in EditKit · Z-Image Loader.")
    key = ("zimage_text", wrapper.__name__, folder_key(folder, "text_encoder", "tokenizer") if file is None else None,
           file_key(file), str(comfy_tokenizer_dir), dtype)
    return LazyModel(key, lambda: _text_encoder(folder, file, comfy_tokenizer_dir, dtype, wrapper),
                     f"{getattr(wrapper, 'display', 'Z-Image')} text encoder")
