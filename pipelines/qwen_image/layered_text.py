"""Qwen-Image-Layered's text side: its prompt template, and the caption it writes when no prompt is given.

The prompt is encoded without the picture (Qwen-Image's text-to-image template, whose 34-token system
part is dropped) and cut to 512 tokens, as diffusers' ``QwenImageLayeredPipeline`` does. With an empty
prompt the pipeline first asks Qwen2.5-VL to describe the picture (English or Chinese instructions,
greedy decoding, up to 512 new tokens) and uses that caption as the prompt. The templates below are
Qwen's published prompts and must stay byte for byte as they are (their odd line breaks included): the
model was trained on them.

Why captioning is written here rather than by loading ``Qwen2_5_VLForConditionalGeneration``: the 7B
language model is already in memory as the family's text encoder (:mod:`.text`); a generation wrapper
borrows it and adds only the head (545 M parameters), instead of loading a second 7B copy.
Captions and prompt encodings are cached per encoder, so re-running with another seed or step count
does not run the encoder again.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict

import torch

from ..core.errors import EditKitError
from ..core.runtime import Runtime

TEMPLATE = (
    "<|im_start|>system\n"
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n"
    "{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP_TOKENS = 34  # the template's system part (prompt_template_encode_start_idx)
MAX_TEXT_TOKENS = 512  # the pipeline's max_sequence_length
MAX_CAPTION_TOKENS = 512
CAPTION_LANGUAGES = ("en", "zh")
CAPTION_PROMPTS = {
    "en": (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "# Image Annotator\n"
        "You are a professional\n"
        "image annotator. Please write an image caption based on the input image:\n"
        "1. Write the caption using natural,\n"
        "descriptive language without structured formats or rich text.\n"
        "2. Enrich caption details by including: \n"
        " - Object\n"
        "attributes, such as quantity, color, shape, size, material, state, position, actions, and so on\n"
        " - Vision Relations\n"
        "between objects, such as spatial relations, functional relations, possessive relations, attachment relations, action\n"
        "relations, comparative relations, causal relations, and so on\n"
        " - Environmental details, such as weather, lighting,\n"
        "colors, textures, atmosphere, and so on\n"
        " - Identify the text clearly visible in the image, without translation or\n"
        "explanation, and highlight it in the caption with quotation marks\n"
        "3. Maintain authenticity and accuracy:\n"
        " - Avoid\n"
        "generalizations\n"
        " - Describe all visible information in the image, while do not add information not explicitly shown in\n"
        "the image\n"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "zh": (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "# 图像标注器\n"
        "你是一个专业的图像标注器。请基于输入图像，撰写图注:\n"
        "1.\n"
        "使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n"
        "2. 通过加入以下内容，丰富图注细节：\n"
        " - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n"
        " -\n"
        "对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n"
        " - 环境细节：例如天气、光照、颜色、纹理、气氛等\n"
        " - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n"
        "3.\n"
        "保持真实性与准确性：\n"
        " - 不要使用笼统的描述\n"
        " -\n"
        "描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}
_CACHE_SIZE = 32


class _Memo:
    """A small LRU per text encoder (weakly keyed, so freeing the encoder frees its entries)."""

    def __init__(self):
        self._tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, owner, key):
        with self._lock:
            table = self._tables.get(owner)
            if table is None or key not in table:
                return None
            table.move_to_end(key)
            return table[key]

    def put(self, owner, key, value) -> None:
        with self._lock:
            table = self._tables.setdefault(owner, OrderedDict())
            table[key] = value
            while len(table) > _CACHE_SIZE:
                table.popitem(last=False)


_EMBEDDINGS = _Memo()
_CAPTIONS = _Memo()
_CAPTIONERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.inference_mode()
def encode_prompt(encoder, prompt: str, runtime: Runtime) -> torch.Tensor:
    """Hidden states ``[1,T,D]`` (float32, CPU) of ``prompt`` in the Layered template, ``T <= 512``."""
    cached = _EMBEDDINGS.get(encoder, prompt)
    if cached is not None:
        return cached
    tokens = encoder.processor.tokenizer([TEMPLATE.format(prompt)], padding=True, return_tensors="pt")
    device = runtime.acquire(encoder.component)
    outputs = encoder.component.module(input_ids=tokens["input_ids"].to(device),
                                       attention_mask=tokens["attention_mask"].to(device), output_hidden_states=True)
    states = outputs.hidden_states[-1][0][tokens["attention_mask"][0].bool().to(device)]
    states = states[DROP_TOKENS:][:MAX_TEXT_TOKENS].unsqueeze(0).float().cpu()
    _EMBEDDINGS.put(encoder, prompt, states)
    return states


def _captioner(encoder, head):
    """A generation wrapper around the encoder's own language model (no second copy) with ``head``."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLForConditionalGeneration

    found = _CAPTIONERS.get(encoder)
    if found is not None and found[1] is head:
        return found[0]
    base = encoder.component.module
    with init_empty_weights(include_buffers=False):
        wrapper = Qwen2_5_VLForConditionalGeneration(base.config)
    wrapper.model = base
    weight = head.weight if head.weight is not None else base.get_input_embeddings().weight
    if tuple(weight.shape) != tuple(base.get_input_embeddings().weight.shape):
        raise EditKitError(
            f"The language-model head of {head.name} is {tuple(weight.shape)}, but the text encoder's vocabulary and "
            f"width are {tuple(base.get_input_embeddings().weight.shape)}: they come from different models."
        )
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight.detach().to(encoder.component.dtype), requires_grad=False)
    wrapper.lm_head = linear
    wrapper.eval()
    _CAPTIONERS[encoder] = (wrapper, head)
    return wrapper


def _picture_key(picture, language: str) -> tuple:
    return (picture.size, picture.mode, hashlib.sha1(picture.tobytes()).hexdigest(), language)


@torch.inference_mode()
def caption(encoder, head, picture, runtime: Runtime, language: str = "en") -> str:
    """What Qwen2.5-VL says the picture (PIL) shows, following the pipeline's captioning instructions."""
    from transformers import GenerationConfig

    if language not in CAPTION_LANGUAGES:
        raise EditKitError(f"Unknown caption language '{language}'. Use one of: {', '.join(CAPTION_LANGUAGES)}.")
    key = _picture_key(picture, language)
    cached = _CAPTIONS.get(encoder, key)
    if cached is not None:
        return cached
    wrapper = _captioner(encoder, head)
    inputs = encoder.processor(text=CAPTION_PROMPTS[language], images=picture, padding=True, return_tensors="pt")
    device = runtime.acquire(encoder.component)
    wrapper.lm_head.to(device)
    try:
        generated = wrapper.generate(**{k: v.to(device) for k, v in inputs.items()},
                                     generation_config=GenerationConfig(**head.generation),
                                     max_new_tokens=MAX_CAPTION_TOKENS)
    finally:
        wrapper.lm_head.to("cpu")  # the head is not part of the encoder ComfyUI manages: keep it off the GPU
    new_tokens = generated[:, inputs["input_ids"].shape[1]:]
    text = encoder.processor.batch_decode(new_tokens, skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)[0].strip()
    _CAPTIONS.put(encoder, key, text)
    return text
