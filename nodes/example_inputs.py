"""Put the bundled example pictures where ComfyUI's Load Image looks, without ever replacing a user's file.

The templates under ``workflows/`` load pictures such as ``editkit_table.png`` by name. Load Image only lists
files in ComfyUI's input folder, so on a fresh install a template failed with "Invalid image file" until the user
copied ``workflows/inputs/`` by hand. When the pack is imported inside ComfyUI, :func:`install_example_inputs`
copies each example picture into the input folder **only when no file of that name is there**: a user's own
picture of the same name always wins, and nothing is rewritten on later starts.

Each copy is written to a hidden temporary name first and then hard-linked to its final name, an operation that
fails instead of replacing an existing file, so a file that appears meanwhile is not overwritten and a crash never
leaves a half-written picture under the real name. Problems (a read-only input folder, a full disk) are logged
and never stop the pack from loading: the templates still open, and the log says what to copy where.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from . import comfy_bridge

log = logging.getLogger("EditKit")

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "workflows" / "inputs"
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def example_pictures(source: Path = EXAMPLES_DIR) -> list[Path]:
    """The example pictures the templates load (sorted; other files are ignored)."""
    if not source.is_dir():
        return []
    return sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES)


def _copy_if_absent(picture: Path, target: Path) -> bool:
    """Copy ``picture`` to ``target`` unless ``target`` exists; True when copied."""
    if target.exists() or target.is_symlink():
        return False
    partial = target.with_name(f".{target.name}.editkit-partial")
    shutil.copyfile(picture, partial)
    try:
        try:
            os.link(partial, target)  # raises FileExistsError instead of replacing a file
        except FileExistsError:
            return False
        except OSError:
            # No hard links on this file system: exclusive create, still never replacing a file.
            try:
                with open(target, "xb") as handle, open(partial, "rb") as data:
                    shutil.copyfileobj(data, handle)
            except FileExistsError:
                return False
        return True
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()


def install_example_inputs(target_dir: Path | None = None, source: Path = EXAMPLES_DIR) -> list[Path]:
    """Copy the example pictures missing from ``target_dir`` (default: ComfyUI's input folder) into it.

    Returns the files written. Without ComfyUI and without ``target_dir`` nothing happens. Existing files
    (the user's, or copies from an earlier start) are left exactly as they are.
    """
    if target_dir is None:
        target_dir = comfy_bridge.input_directory()
        if target_dir is None:
            return []
    target_dir = Path(target_dir)
    written = []
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        for picture in example_pictures(source):
            if _copy_if_absent(picture, target_dir / picture.name):
                written.append(target_dir / picture.name)
    except OSError as error:
        log.warning("EditKit could not copy its example pictures into %s (%s). The templates need them: copy "
                    "the files of %s there yourself, or pick your own pictures in Load Image.",
                    target_dir, error, source)
    if written:
        log.info("EditKit copied %d example picture(s) for its templates into %s: %s", len(written), target_dir,
                 ", ".join(p.name for p in written))
    return written
