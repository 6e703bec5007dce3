"""Pictures in, files out: picture checks, upload names, atomic writes, safe output names.

Outputs are written to a temporary file in a hidden folder of the output directory and moved into
place with ``os.replace`` (atomic on one filesystem), so a reader, a resumed batch or a person never
sees half a picture even after ``kill -9``. Leftovers of a killed run only ever sit in that hidden
folder, which the next run empties and every run removes when it ends. Files get the mode a plain
``open()`` would give them (0644 under the usual umask 022), not ``mkstemp``'s private 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import WorkflowError

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PARTIAL_DIR = ".editkit-partial"
FORMAT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff"}


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


FILE_MODE = 0o666 & ~_umask()  # read once at import: os.umask can only be read by setting it


def picture_info(data: bytes, source: str, max_pixels: int | None = None) -> tuple[str, int, int]:
    """(format, width, height) of an encoded picture; anything Pillow cannot decode is refused.

    The message says what the bytes look like instead of Pillow's own text, which names an internal
    ``BytesIO`` object and tells the sender nothing.
    """
    try:
        with Image.open(io.BytesIO(data)) as picture:
            width, height = picture.size
            fmt = picture.format or "PNG"
            if max_pixels and width * height > max_pixels:
                raise WorkflowError(f"{source} is {width}×{height} pixels, more than the limit of {max_pixels} "
                                    "pixels; send a smaller picture")
            picture.verify()
    except WorkflowError:
        raise
    except UnidentifiedImageError as exc:
        start = data[:12]
        what = "empty" if not data else f"starts with {start!r}"
        raise WorkflowError(f"{source} is not a picture Pillow can read: its content ({len(data)} bytes, {what}) is "
                            "not PNG, JPEG, WebP, BMP, GIF or TIFF; send the picture file's bytes") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(exc))
        raise WorkflowError(f"{source} is not a picture Pillow can read ({type(exc).__name__}: {detail}); the file "
                            "may be truncated or damaged: send it again or re-save it") from exc
    return fmt, width, height


def read_picture(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise WorkflowError(f"cannot read picture '{path}': {exc.strerror or exc}") from exc
    picture_info(data, f"'{path}'")
    return data


def upload_name(data: bytes, hint: str) -> str:
    """A name derived from the content, so re-uploads of the same picture are recognised by ComfyUI
    (same name, same bytes → kept once) and a different picture never replaces a user's file."""
    digest = hashlib.sha256(data).hexdigest()[:20]
    stem = safe_stem(Path(hint).stem)[:40] or "picture"
    fmt = "PNG"
    try:
        with Image.open(io.BytesIO(data)) as picture:
            fmt = picture.format or "PNG"
    except (UnidentifiedImageError, OSError):
        pass
    return f"editkit-{digest}-{stem}{FORMAT_SUFFIX.get(fmt, '.png')}"


def safe_stem(text: str) -> str:
    """File-name-safe text that keeps letters of any script (Unicode names stay readable)."""
    text = unicodedata.normalize("NFC", str(text))
    text = re.sub(r"[^\w.-]+", "_", text, flags=re.UNICODE).strip("._")
    return text[:80]


def partial_dir(out_dir: Path) -> Path:
    return Path(out_dir) / PARTIAL_DIR


def clear_partials(out_dir: Path) -> None:
    """Remove what a killed run left half-written (only ever inside the hidden partial folder), and the
    folder itself, so no empty hidden folder stays behind."""
    shutil.rmtree(partial_dir(out_dir), ignore_errors=True)


def write_file_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (created or truncated, the usual file mode) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path, data: bytes, out_dir: Path | None = None) -> Path:
    """Write ``data`` to ``path`` all at once: temp file (fsynced) then ``os.replace``.

    With ``out_dir`` the temporary file sits in ``out_dir``'s hidden partial folder, which is removed
    again when it is empty afterwards.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = partial_dir(out_dir) if out_dir else path.parent
    tmp_root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_root, prefix=".part-", suffix=path.suffix)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        if out_dir:
            remove_if_empty(tmp_root)
    return path


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` when it is empty; one that is not (a file is being written) or is gone stays as it is."""
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def list_pictures(folders: list[Path]) -> list[tuple[Path, Path]]:
    """(root folder, picture path) for every picture under the folders, recursively, sorted.

    Folders are only read. A folder that is missing or holds no picture is an error naming it, with
    what it does hold, so a typo or a wrong extension is obvious.
    """
    found: list[tuple[Path, Path]] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise WorkflowError(f"input folder '{folder}' does not exist or is not a folder")
        pictures, others = [], 0
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith("."):
                    continue
                if path.suffix.lower() in PICTURE_SUFFIXES:
                    pictures.append(path)
                else:
                    others += 1
        if not pictures:
            raise WorkflowError(f"input folder '{folder}' holds no pictures ({others} other file(s); pictures are "
                                f"{', '.join(sorted(PICTURE_SUFFIXES))})")
        found.extend((folder, p) for p in pictures)
    return found
