"""Old name of ``tiny.qwen_image``, kept while ``scripts/bench`` and ``test_streaming.py`` import it (use ``tiny``)."""

from functools import partial

from tiny import core
from tiny.core import comfy_keys as transformer_to_comfy  # noqa: F401
from tiny.core import save as _save  # noqa: F401
from tiny.qwen_image import *  # noqa: F403
from tiny.qwen_image import FAMILY, text_encoder_keys

tiny_components = FAMILY.components
qwen_tree = FAMILY.tree
text_encoder_to_comfy = text_encoder_keys()
write_gguf = partial(core.write_gguf, arch="qwen_image", name="Qwen-Image-Edit-2509")
