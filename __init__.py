"""EditKit: a ComfyUI custom-node pack for image editing.

ComfyUI imports this folder as a package and reads ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS`` (V1 node API). The pack also imports without ComfyUI, which
is how its tests, the smoke command and the training CLI use it.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
