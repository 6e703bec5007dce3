"""Old name of ``tiny.zimage``, kept while ``scripts/bench`` and ``test_streaming.py`` import it (use ``tiny``)."""

from tiny.zimage import *  # noqa: F403
