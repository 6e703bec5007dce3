"""Give the memory a freed model leaves in the C heap back to the operating system.

Freeing a model drops its tensors, but on Linux glibc keeps freed blocks below its mmap threshold (which it
raises to 32 MB once large blocks have been freed) in the process heap for reuse, so RSS stays up: loading
FLUX.1-dev's 12B GGUF file and freeing it left 1.1 GB resident (``scripts/bench/memory.py``: +228 % of the
baseline), all of it returned by ``malloc_trim(0)``. ComfyUI's ``/free`` frees models but never trims; EditKit
trims whenever one of its models has been collected, which costs milliseconds. Elsewhere (macOS, Windows,
musl) there is no ``malloc_trim`` and this does nothing.

When: a weak-reference callback runs as the model starts to be destroyed, before its tensors are released,
so it only marks a trim as due; the trim itself runs at the end of the next garbage collection (a
``gc.callbacks`` hook; ComfyUI's ``/free`` runs ``gc.collect()``, and collections happen all the time
anyway), by which time the model's memory has been freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import weakref

_due = False


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """Return free heap memory to the OS where the C library can (glibc); whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def trim_when_collected(owner: object) -> None:
    """Return freed heap memory to the OS after the garbage collection that follows ``owner``'s (a model's)
    destruction."""
    weakref.finalize(owner, _mark_due)


def _mark_due() -> None:
    global _due
    _due = True


def _after_collection(phase: str, _info: dict) -> None:
    global _due
    if phase == "stop" and _due:
        _due = False
        return_freed_memory()


if _after_collection not in gc.callbacks:
    gc.callbacks.append(_after_collection)
