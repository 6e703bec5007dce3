"""Old name of ``tiny.redux``, kept while ``scripts/bench`` imports it (use ``tiny``)."""

from tiny.redux import *  # noqa: F403
