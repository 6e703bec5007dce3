"""Every model family EditKit samples, by name: the declarations shared code and the tests iterate over.

Imported lazily (each family pulls in diffusers), so ``families()`` costs nothing until asked.
"""

from __future__ import annotations

import importlib

_DECLARED = {
    "flux": ("flux.family", "FAMILY"),
    "qwen_image": ("qwen_image.family", "FAMILY"),
    "qwen_layered": ("qwen_image.family", "LAYERED"),
    "zimage": ("zimage.family", "FAMILY"),
    "flux2": ("flux2.family", "FAMILY"),
}


def family(name: str):
    """The :class:`~.core.family.Family` declared as ``name`` (a key of :func:`names`)."""
    module, attribute = _DECLARED[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), attribute)


def names() -> tuple[str, ...]:
    return tuple(_DECLARED)


def families() -> dict:
    return {name: family(name) for name in _DECLARED}
