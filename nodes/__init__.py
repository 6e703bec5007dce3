"""ComfyUI glue: one module per job plus ``comfy_bridge`` (the only ComfyUI importer).

Each node module exports ``NODES``: a list of node classes. Node ids are the class names
(``EditKit<Thing>``); display names come from each class's ``DISPLAY_NAME``.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("EditKit")

_MODULES = (
    "flux_nodes",
    "flux_generate_nodes",
    "lora_nodes",
    "redux_nodes",
    "ben2_nodes",
    "kontext_nodes",
    "qwen_image_nodes",
    "qwen_layered_nodes",
    "zimage_nodes",
    "flux2_nodes",
)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _name in _MODULES:
    try:
        _module = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{_name}":
            continue  # that job is not part of this build
        raise
    for _cls in _module.NODES:
        NODE_CLASS_MAPPINGS[_cls.__name__] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_cls.__name__] = _cls.DISPLAY_NAME

from .example_inputs import install_example_inputs  # noqa: E402  (inside ComfyUI: templates' pictures, if absent)

install_example_inputs()
