"""LoRA nodes: one factory makes the LoRA node of every model family (thin glue over pipelines.core.lora).

A family's LoRA node is one call::

    EditKitQwenImageLora = lora_node_class(
        FAMILY.lora, "EDITKIT_QWEN_IMAGE", class_name="EditKitQwenImageLora",
        display_name="EditKit · Qwen-Image LoRA", category="EditKit/qwen-image", family_models="Qwen-Image")

plus adding the class to ``NODES`` below. See docs/lora.md.
"""

from __future__ import annotations

from ..pipelines.core.errors import EditKitError
from ..pipelines.core.lora import LORA_EXTENSIONS, LoraFamily, add_lora
from ..pipelines.flux.family import FAMILY as FLUX
from . import comfy_bridge as bridge
from .common import LoaderFiles, ModelFile, files_signature


def lora_node_class(family: LoraFamily, model_type: str, *, class_name: str, display_name: str, category: str,
                    family_models: str, attribute: str = "transformer") -> type:
    """A V1 node class ``model, lora_name, strength -> model`` for one family's model handle.

    ``model_type`` is the family's ``EDITKIT_*`` model type; ``attribute`` names the lazy
    transformer on its handle (``FluxModel.transformer``). The node copies the handle with the
    LoRA added: the incoming model, and whatever else uses it, is unchanged.
    """

    files = LoaderFiles({"lora_name": ModelFile("loras", f"a {family_models} LoRA (.safetensors)")})

    class LoraNode:
        DISPLAY_NAME = display_name
        CATEGORY = category
        DESCRIPTION = (
            f"Adds a LoRA to a {family_models} model. Chain several nodes to stack LoRAs. The LoRA is applied "
            "only while a sampler runs this model, so the model without the LoRA (used by other nodes, or after "
            "you remove this node) is exactly unchanged; strength 0 gives exactly the model's own output. "
            "Reads diffusers/PEFT, kohya and ComfyUI/BFL LoRA files from models/loras; works on GGUF models too."
        )
        FUNCTION = "apply"
        LORA_FAMILY = family  # the key rules this node converts with (tests/test_family_declarations.py)
        RETURN_TYPES = (model_type,)
        RETURN_NAMES = ("model",)
        OUTPUT_TOOLTIPS = (f"The {family_models} model with this LoRA (and any earlier ones) applied when sampling.",)

        @classmethod
        def INPUT_TYPES(cls):
            return {
                "required": {
                    "model": (model_type, {"tooltip": f"The {family_models} model, from its loader or another "
                                                       "LoRA node."}),
                    "lora_name": (bridge.list_models("loras", LORA_EXTENSIONS), {
                        "tooltip": f"A {family_models} LoRA (.safetensors) from models/loras: diffusers/PEFT, kohya "
                                   "or ComfyUI/BFL keys. A LoRA for another model family is refused with an error.",
                    }),
                    "strength": ("FLOAT", {
                        "default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                        "tooltip": "How strongly the LoRA changes the model: 1 as trained, 0 off, negative "
                                   "values push away from what it learned.",
                    }),
                }
            }

        @classmethod
        def IS_CHANGED(cls, lora_name, **_):
            try:
                return files_signature([bridge.model_path("loras", lora_name)])
            except EditKitError:
                return ""  # apply() reports the missing file

        @classmethod
        def VALIDATE_INPUTS(cls, lora_name):
            return files.check(lora_name=lora_name)

        def apply(self, model, lora_name, strength):
            return (add_lora(model, family, bridge.model_path("loras", lora_name), strength, attribute),)

    LoraNode.__name__ = LoraNode.__qualname__ = class_name
    return LoraNode


EditKitFluxLora = lora_node_class(
    FLUX.lora, "EDITKIT_FLUX", class_name="EditKitFluxLora", display_name="EditKit · Flux LoRA",
    category="EditKit/flux", family_models="FLUX.1",
)

NODES = [EditKitFluxLora]
