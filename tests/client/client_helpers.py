"""Small helpers shared by the client's tests (a module of its own: ``conftest`` is ambiguous on sys.path)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image


def png_bytes(color=(200, 30, 60), size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def client_env() -> dict:
    """The environment for ``python -m client`` subprocesses: the repository root importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    return env
