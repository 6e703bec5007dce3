"""FLUX.2 [klein]'s prompt features: Qwen3 hidden states of three layers, stacked, as ``Flux2KleinPipeline`` builds them.

The Qwen3 model, its files and tokenizer are Z-Image's (:mod:`..zimage.text`: the same ``qwen_3_4b.safetensors``
serves klein 4B); only the recipe differs, so this module subclasses Z-Image's encoder:

* the chat format without thinking (``enable_thinking=False``);
* the prompt is padded to 512 tokens (``padding="max_length"``) with an attention mask, and all 512 states are
  kept: the transformer attends to the padding positions too (it gets no text mask), so dropping them would
  change the picture;
* the features are the hidden states of layers 9, 18 and 27 of Qwen3's 36 (``hidden_states[k]``, the embedding
  output being index 0), concatenated per token: ``[512, 3 x hidden]`` (7680 for Qwen3-4B, 12288 for 8B). For
  encoders of another depth (EditKit's tiny test models) the same quarter points are taken:
  ``(n/4, n/2, 3n/4)`` (:func:`feature_layers`).

CONDITIONING is ComfyUI's list of pairs ``[[states [1, 512, 3D], {}]]``.
"""

from __future__ import annotations

import logging

import torch

from ..core.errors import EditKitError
from ..core.runtime import Runtime
from ..zimage.text import ZImageTextEncoder

log = logging.getLogger("EditKit")

MAX_SEQUENCE_LENGTH = 512
KLEIN_LAYERS = (9, 18, 27)  # of Qwen3's 36, diffusers' text_encoder_out_layers


def feature_layers(depth: int) -> tuple[int, ...]:
    """The hidden-state indices klein stacks: (9, 18, 27) for 36 layers, the same quarter points otherwise."""
    if depth == 36:
        return KLEIN_LAYERS
    if depth < 3:
        raise EditKitError(f"A Qwen3 text encoder with {depth} layers cannot feed FLUX.2 [klein] (it needs 3 or more).")
    return (depth // 4, depth // 2, 3 * depth // 4)


class Flux2TextEncoder(ZImageTextEncoder):
    """Qwen3 with klein's prompt recipe and a small per-prompt cache (each entry is 512 x 3 x hidden floats)."""

    display = "FLUX.2 [klein]"
    cache_size = 8

    @property
    def width(self) -> int:
        return 3 * int(self.encoder.module.config.hidden_size)

    @property
    def layers(self) -> tuple[int, ...]:
        return feature_layers(int(self.encoder.module.config.num_hidden_layers))

    def tokens(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        out = self.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True,
                             max_length=self.max_sequence_length)
        return out["input_ids"], out["attention_mask"]

    @torch.inference_mode()
    def _encode_one(self, prompt: str, runtime: Runtime) -> torch.Tensor:
        ids, mask = self.tokens(prompt)
        device = runtime.acquire(self.encoder)
        out = self.encoder.module(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                                  use_cache=False)
        states = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)  # [1, 3, T, D]
        b, n, t, d = states.shape
        return states.permute(0, 2, 1, 3).reshape(b, t, n * d)[0].float().cpu()


def make_conditioning(states: torch.Tensor) -> list:
    """``[T, 3D]`` features → ComfyUI CONDITIONING ``[[states [1, T, 3D], {}]]``."""
    return [[states.unsqueeze(0), {}]]


def read_conditioning(conditioning, width: int, what: str = "positive") -> torch.Tensor:
    """A FLUX.2 CONDITIONING → its states ``[1, T, width]``, with a clear error for foreign ones."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise EditKitError(f"The {what} CONDITIONING is empty. Connect EditKit · FLUX.2 Text Encode.")
    if len(conditioning) > 1:
        log.warning("EditKit: the %s CONDITIONING has %d entries; FLUX.2 uses the first one.", what, len(conditioning))
    states = conditioning[0][0]
    if not torch.is_tensor(states) or states.ndim != 3:
        raise EditKitError(f"The {what} CONDITIONING does not hold text states [batch, tokens, width]. Encode the "
                           "prompt with EditKit · FLUX.2 Text Encode.")
    if states.shape[-1] != width:
        hint = {4096: " (FLUX.1's T5-XXL)", 2560: " (Z-Image's Qwen3 features)"}.get(int(states.shape[-1]), "")
        raise EditKitError(
            f"The {what} prompt was encoded to width {states.shape[-1]}{hint}, but this FLUX.2 transformer reads "
            f"{width}-wide features (three Qwen3 layers stacked). Encode it with EditKit · FLUX.2 Text Encode and "
            "the Qwen3 encoder that belongs to this model (qwen_3_4b for klein 4B, qwen_3_8b for 9B)."
        )
    return states[:1]
