"""Old name of ``tiny.zimage``, kept for ``scripts/bench`` and ``test_streaming.py`` (import ``tiny`` instead)."""

from tiny.zimage import COMFY_PREFIX, TINY_TRANSFORMER, diffusers_to_comfy  # noqa: F401
