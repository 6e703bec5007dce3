"""Old name of ``tiny.qwen_image``, kept for ``scripts/bench`` and ``test_streaming.py`` (import ``tiny`` instead)."""

from functools import partial

from tiny import core
from tiny.core import comfy_keys as transformer_to_comfy  # noqa: F401
from tiny.core import save as _save  # noqa: F401
from tiny.qwen_image import FAMILY, TINY_TRANSFORMER, TINY_VAE  # noqa: F401

tiny_components = FAMILY.components
write_gguf = partial(core.write_gguf, arch="qwen_image", name="Qwen-Image-Edit-2509")
