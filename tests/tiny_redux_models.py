"""Old name of ``tiny.redux``, kept for ``scripts/bench`` (import ``tiny`` instead)."""

from tiny.redux import TINY_SIGLIP, tiny_processor  # noqa: F401
