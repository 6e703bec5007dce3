"""Tiny random-weight models of every EditKit family, in the real file formats, as a ComfyUI-style models tree.

    python tests/make_tiny_models.py OUT_DIR

Each family is a declaration (``tests/tiny/<family>.py``: parts, folders, files); ``core.py`` builds and writes
them. A new family adds one such module and a line in ``FAMILIES``.
"""

from __future__ import annotations

from pathlib import Path

from . import ben2, flux1, flux2, qwen_image, qwen_layered, redux, zimage
from .core import offline

# family module, write its single files too (Qwen-Image-Layered's only in its own tests: its text encoder is large)
FAMILIES = [(flux1, True), (ben2, True), (redux, True), (zimage, True), (qwen_image, True), (flux2, True),
            (qwen_layered, False)]


def make_tree(out_dir: str | Path) -> dict[str, Path]:
    """Write every family's tiny models into ``out_dir``; return the paths by ``family.role``."""
    offline()
    paths = {}
    for module, single_files in FAMILIES:
        family = module.FAMILY
        paths.update({f"{family.name}.{role}": path
                      for role, path in family.write(out_dir, single_files=single_files).items()})
    return paths
