"""Errors a user can act on.

Every message says what was wrong and how to fix it, because inside ComfyUI the message is
all the user sees (it is shown in the red error box and sent as ``execution_error``).

ComfyUI reports an error's ``exception_type`` as ``<class module>.<class qualname>``, and it
imports a custom-node pack under its folder path, so the real module name reads like
``/home/me/ComfyUI/custom_nodes/editkit.pipelines.core.errors``. Every EditKit error class
(subclasses too, wherever they are defined) therefore reports the short module ``editkit``:
the user sees ``editkit.EditKitError``, not a file path.
"""

from __future__ import annotations

import re
from pathlib import Path

PUBLIC_MODULE = "editkit"


def _clause(text: str) -> str:
    """``text`` without its closing full stop, so joining clauses never gives ``.:``, ``..`` or ``.).``.

    Also drops a full stop just inside closing brackets, as in ``"Cannot read it (bad header.)"``
    built from an exception's own message.
    """
    text = str(text).rstrip()
    while True:
        trimmed = re.sub(r"\.+(\)*)$", r"\1", text).rstrip()
        if trimmed == text:
            return text
        text = trimmed


class EditKitError(ValueError):
    """Bad input that the user can fix. The message names the problem and the fix."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = PUBLIC_MODULE


EditKitError.__module__ = PUBLIC_MODULE


class ModelFileError(EditKitError):
    """A model file is missing, unreadable or of the wrong architecture.

    The message names the file first, then the problem (which may be several sentences, e.g. a
    hint about what the file really is), then what was expected.
    """

    def __init__(self, path: str | Path, problem: str, expected: str):
        path = Path(path)
        self.path = path
        super().__init__(f"'{path.name}' in folder '{path.parent}': {_clause(problem)}. Expected {_clause(expected)}.")


class Interrupted(Exception):
    """Raised by the plain-torch runtime when a run is interrupted (ComfyUI raises its own)."""


Interrupted.__module__ = PUBLIC_MODULE
