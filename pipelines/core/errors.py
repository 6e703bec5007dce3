"""Errors a user can act on.

Every message says what was wrong and how to fix it, because inside ComfyUI the message is
all the user sees (it is shown in the red error box and sent as ``execution_error``).
"""

from __future__ import annotations

from pathlib import Path


class EditKitError(ValueError):
    """Bad input that the user can fix. The message names the problem and the fix."""


class ModelFileError(EditKitError):
    """A model file is missing, unreadable or of the wrong architecture."""

    def __init__(self, path: str | Path, problem: str, expected: str):
        path = Path(path)
        self.path = path
        super().__init__(
            f"{problem}: '{path.name}' in folder '{path.parent}'. Expected {expected}."
        )


class Interrupted(Exception):
    """Raised by the plain-torch runtime when a run is interrupted (ComfyUI raises its own)."""
