"""Qwen2.5-VL, the text encoder of Qwen-Image-Edit: loading, and prompts encoded together with pictures.

The edit instruction is encoded *with* the pictures: each picture's vision-language copy goes
through Qwen2.5-VL's vision tower, and the last hidden states of the whole chat (minus the
fixed system prompt) condition the transformer. The templates, the "Picture N:" markers of
Edit-2509, the 64 dropped template tokens and the processor's expansion of ``<|image_pad|>``
are exactly those of diffusers' ``QwenImageEditPlusPipeline`` / ``QwenImageEditPipeline``.

Encodings are cached per (template, prompt, pictures, picture sizes) on the encoder object,
so re-running an edit with another seed, steps or CFG scale does not run the 7B model again.

Without torchvision, transformers' ``Qwen2VLProcessor`` cannot be built as shipped (it
type-checks its empty video slot), so a subclass without the video slot is used; the PIL
image processor does the vision copy's resizing and normalisation.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..core.errors import EditKitError, ModelFileError
from ..core.loading import LazyModel, file_key, folder_key, read_state_dict, unavailable
from ..core.runtime import Component, Runtime
from ..core.transformers_loading import from_state_dict
from .loading import CONFIG_DIR, EDIT, EDIT_2509, count_blocks

log = logging.getLogger("EditKit")

TEXT_ENCODER_EXPECTED = (
    "the Qwen2.5-VL-7B text encoder with its vision tower (ComfyUI's qwen_2.5_vl_7b.safetensors or "
    "qwen_2.5_vl_7b_fp8_scaled.safetensors)"
)

SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
TEMPLATES = {
    EDIT_2509: SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n",
    EDIT: SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n",
}
PICTURE_MARKER = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
DROP_TOKENS = 64  # the system prompt's tokens, as prompt_template_encode_start_idx
TEXT_HEAD_DIM = 128  # Qwen2.5 (all sizes): attention heads are 128 wide
VISION_HEAD_DIM = 80  # Qwen2.5-VL vision tower: 1280 wide, 16 heads
_CACHE_SIZE = 32


def template_text(variant: str, prompt: str, pictures: int) -> str:
    """The chat text the encoder reads for ``prompt`` with ``pictures`` pictures."""
    if variant == EDIT:
        if pictures != 1:
            raise EditKitError(
                f"The original Qwen-Image-Edit takes exactly one picture (got {pictures}). Use Qwen-Image-Edit-2509 "
                "or -2511 for several pictures, or disconnect image2..image5 and references."
            )
        return TEMPLATES[EDIT].format(prompt)
    markers = "".join(PICTURE_MARKER.format(i + 1) for i in range(pictures))
    return TEMPLATES[EDIT_2509].format(markers + prompt)


def _processor_class():
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class PicturesOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without the video slot (which needs torchvision to exist)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return PicturesOnlyQwen2VLProcessor


def make_processor(image_processor, tokenizer):
    return _processor_class()(image_processor, tokenizer)


def _picture_digest(picture) -> tuple:
    return (picture.size, picture.mode, hashlib.sha1(picture.tobytes()).hexdigest())


class QwenTextEncoder:
    """Qwen2.5-VL (``Qwen2_5_VLModel``) + tokenizer + image processor, with a per-input cache (CPU tensors)."""

    def __init__(self, component: Component, tokenizer, image_processor):
        self.component = component
        self.processor = make_processor(image_processor, tokenizer)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def width(self) -> int:
        return int(self.component.module.config.text_config.hidden_size)

    def encode(self, prompt: str, pictures: list, variant: str, runtime: Runtime) -> torch.Tensor:
        """Hidden states ``[1,T,D]`` (float32, CPU) of ``prompt`` with the vision copies ``pictures`` (PIL)."""
        key = (variant, prompt, tuple(_picture_digest(p) for p in pictures))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        states = self._encode(prompt, pictures, variant, runtime)
        with self._lock:
            self._cache[key] = states
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return states

    @torch.inference_mode()
    def _encode(self, prompt: str, pictures: list, variant: str, runtime: Runtime) -> torch.Tensor:
        text = template_text(variant, prompt, len(pictures))
        inputs = self.processor(text=[text], images=pictures or None, padding=True, return_tensors="pt")
        device = runtime.acquire(self.component)
        model = self.component.module
        outputs = model(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            pixel_values=inputs["pixel_values"].to(device) if "pixel_values" in inputs else None,
            image_grid_thw=inputs["image_grid_thw"].to(device) if "image_grid_thw" in inputs else None,
            output_hidden_states=True,
        )
        states = outputs.hidden_states[-1][0][inputs["attention_mask"][0].bool().to(device)]
        return states[DROP_TOKENS:].unsqueeze(0).float().cpu()


# --------------------------------------------------------------------------------------
# Loading


def _key_role(key: str) -> tuple[str, str] | None:
    """``("text"|"visual", rest)`` for a Qwen2.5-VL key in any published layout; None for lm_head etc."""
    for prefix in ("model.visual.", "visual."):
        if key.startswith(prefix):
            return ("visual", key[len(prefix):])
    for prefix in ("model.language_model.", "language_model.model.", "language_model.", "model."):
        if key.startswith(prefix):
            return ("text", key[len(prefix):])
    return None


def _describe_foreign(sd: dict) -> str:
    keys = set(sd)
    if "shared.weight" in keys or any("SelfAttention" in k for k in keys):
        return "a T5 text encoder (FLUX.1 / SD3), not Qwen2.5-VL"
    if any("text_model." in k or k.startswith("embeddings.token_embedding") for k in keys):
        return "a CLIP text encoder, not Qwen2.5-VL"
    if any(k.endswith("self_attn.q_norm.weight") for k in keys):
        return "a Qwen3 text encoder (Z-Image's qwen_3_4b), not Qwen2.5-VL"
    if any(k.endswith("layers.0.self_attn.q_proj.weight") for k in keys) and not any("visual." in k for k in keys):
        return "a text-only language model without Qwen2.5-VL's vision tower"
    sample = ", ".join(list(sd)[:3]) or "no tensors"
    return f"not a Qwen2.5-VL text encoder (found keys like {sample})"


def _text_encoder_from_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """Qwen2.5-VL from a single file: config from the shapes, then transformers' own loader (fp32 rotary)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    raw = read_state_dict(path, TEXT_ENCODER_EXPECTED)
    by_role = {}
    for key, tensor in raw.items():
        role = _key_role(key)
        if role is not None:
            by_role[role] = tensor
    needed = [("text", "embed_tokens.weight"), ("text", "layers.0.self_attn.q_proj.bias"),
              ("visual", "patch_embed.proj.weight"), ("visual", "merger.mlp.2.weight")]
    if any(n not in by_role for n in needed):
        raise ModelFileError(path, f"This is {_describe_foreign(raw)}", TEXT_ENCODER_EXPECTED)
    del raw
    # Qwen2_5_VLModel's own names: language_model.* and visual.*
    # fp8 weights (and scaled fp8's scale_weight) as they are: core.transformers_loading keeps them in fp8
    sd = {("language_model." if r == "text" else "visual.") + k: v for (r, k), v in by_role.items()}
    t = lambda name: sd[f"language_model.{name}"].shape  # noqa: E731
    v = lambda name: sd[f"visual.{name}"].shape  # noqa: E731
    config = Qwen2_5_VLConfig.from_pretrained(str(CONFIG_DIR / "text_encoder"))
    text, vision = config.text_config, config.vision_config
    text.vocab_size, text.hidden_size = t("embed_tokens.weight")
    text.num_hidden_layers = count_blocks(sd, "language_model.layers.")
    text.intermediate_size = t("layers.0.mlp.gate_proj.weight")[0]
    text.num_attention_heads = t("layers.0.self_attn.q_proj.weight")[0] // TEXT_HEAD_DIM
    text.num_key_value_heads = t("layers.0.self_attn.k_proj.weight")[0] // TEXT_HEAD_DIM
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    text.max_window_layers = text.num_hidden_layers
    vision.hidden_size = v("patch_embed.proj.weight")[0]
    vision.depth = count_blocks(sd, "visual.blocks.")
    vision.intermediate_size = v("blocks.0.mlp.gate_proj.weight")[0]
    vision.num_heads = vision.hidden_size // VISION_HEAD_DIM
    vision.out_hidden_size = v("merger.mlp.2.weight")[0]
    vision.fullatt_block_indexes = [i for i in range(vision.depth) if i % 8 == 7]  # 7, 15, 23, 31 in the 7B
    if vision.out_hidden_size != text.hidden_size:
        raise ModelFileError(path, "Vision tower and language model widths differ", TEXT_ENCODER_EXPECTED)
    return from_state_dict(Qwen2_5_VLModel, config, sd, dtype, path, TEXT_ENCODER_EXPECTED)


def _tokenizer(folder: Path | None, comfy_dir: Path | None):
    from transformers import Qwen2Tokenizer

    candidates = []
    if folder is not None:
        candidates += [folder / "tokenizer", folder / "processor"]
    if comfy_dir is not None:
        candidates.append(comfy_dir)
    for directory in candidates:
        if (directory / "vocab.json").is_file() or (directory / "tokenizer.json").is_file():
            try:
                return Qwen2Tokenizer.from_pretrained(str(directory), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise EditKitError(f"Cannot read the Qwen2.5 tokenizer in '{directory}': {exc}. Re-download it.") from exc
    raise EditKitError(
        "No Qwen2.5 tokenizer found. Pick the Qwen-Image-Edit-2509 diffusers folder in the loader (its tokenizer/ is "
        "used), or run inside ComfyUI, whose bundled qwen25_tokenizer is used with single-file text encoders."
    )


def _image_processor(folder: Path | None):
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # transformers 4.x: the slow processor is PIL-based already
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    directory = CONFIG_DIR / "processor"
    if folder is not None and (folder / "processor" / "preprocessor_config.json").is_file():
        directory = folder / "processor"
    return ImageProcessor.from_pretrained(str(directory), local_files_only=True)


def _text_encoder(folder: Path | None, file: Path | None, comfy_tokenizer_dir: Path | None,
                  dtype: torch.dtype) -> QwenTextEncoder:
    from transformers import Qwen2_5_VLModel

    if file is not None:  # the weights first: a wrong file is the likelier mistake, and says what it is
        model, name = _text_encoder_from_file(file, dtype), file.name
    else:
        sub = folder / "text_encoder"
        if not (sub / "config.json").is_file():
            raise ModelFileError(sub, "No text encoder in this diffusers folder", "a 'text_encoder' sub-folder")
        try:
            model = Qwen2_5_VLModel.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelFileError(sub, f"Cannot load the text encoder ({exc})", TEXT_ENCODER_EXPECTED) from exc
        name = f"{folder.name}/text_encoder"
    tokenizer = _tokenizer(folder, comfy_tokenizer_dir)
    image_processor = _image_processor(folder)
    model.eval().requires_grad_(False)
    return QwenTextEncoder(Component(model, "text_encoder", name, dtype), tokenizer, image_processor)


def text_encoder_source(folder: Path | None, file: Path | None, dtype: torch.dtype,
                        comfy_tokenizer_dir: Path | None = None) -> LazyModel:
    """Lazily loaded Qwen2.5-VL: the single file where given, else the folder's text_encoder."""
    if folder is None and file is None:
        return unavailable("Qwen2.5-VL text encoder", "No text encoder: pick the Qwen-Image-Edit-2509 diffusers folder "
                           "or qwen_2.5_vl_7b*.safetensors in EditKit · Qwen-Image Loader.")
    key = ("qwen_text", folder_key(folder) if file is None else None, file_key(file), str(comfy_tokenizer_dir), dtype)
    description = f"Qwen2.5-VL {file.name}" if file is not None else f"Qwen2.5-VL of {folder.name}"
    return LazyModel(key, lambda: _text_encoder(folder, file, comfy_tokenizer_dir, dtype), description)
