"""Is a model file or diffusers folder whole? Checked from headers and sizes only, without loading a tensor.

Loader nodes run these checks when a prompt is queued (their ``VALIDATE_INPUTS``), so a broken download is
reported on the loader, in a second, with the file's name and its byte count, instead of as a reshape error
deep inside the first node that uses the model, or as a missing ``.bin`` that nobody expected.

What a broken download looks like, and how it is recognised here:

* **Cut short** (an interrupted copy or download): a safetensors file states its header length and every
  tensor's byte range; a GGUF file states every tensor's shape, type and offset, and its data alignment; the
  file must end exactly where the last tensor does (safetensors refuses any other length too). A ``.pth``
  (a zip archive, as ``torch.save`` writes) must still have its end-of-archive record.
* **A Git LFS pointer** instead of the weights (a ``git clone`` without ``git lfs``): a ~130-byte text file.
* **A diffusers folder without all its weights**: each component the loader reads must hold the weight files
  its own index names (``*.safetensors.index.json`` → every shard), or the one file diffusers/transformers
  would load (``diffusion_pytorch_model.safetensors`` for a diffusers model, ``model.safetensors`` for a
  transformers one, read from ``model_index.json``), each of them whole.

Why not the libraries' own readers: ``safetensors.safe_open`` fails on a short file with "incomplete
metadata, file not fully covered" (no sizes), gguf-py's ``GGUFReader`` maps the whole file and fails with a
numpy reshape error, and ``from_pretrained`` on a folder without weights names a ``.bin`` file. The GGUF type
sizes come from gguf-py (``GGML_QUANT_SIZES``), so every type it knows is measured the same way.

Torch-free (standard library; gguf-py and numpy for GGUF type sizes only), so it costs nothing to import in
a node's validation. Results are cached per file (path, size, modification time): validation runs on every
queued prompt, and the headers of a 40 GB sharded model take a few milliseconds to read once.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
LFS_POINTER_PREFIX = b"version https://git-lfs"
MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors itself refuses larger headers
GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
# model_index.json names each component's library; this is the one weight file each library loads from a
# component folder when no index file names shards.
SINGLE_WEIGHT_FILE = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}
LEGACY_WEIGHT_FILE = {"diffusers": "diffusion_pytorch_model.bin", "transformers": "pytorch_model.bin"}


@dataclass(frozen=True)
class Damage:
    """One problem with a file or folder: ``path`` (what is broken or missing) and ``problem`` (why)."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path.name} ({self.problem})"


def _bytes(count: int) -> str:
    return f"{count:,} bytes"


def _short(size: int, expected: int) -> str:
    return f"incomplete or damaged: {size:,} of {expected:,} bytes"


# --------------------------------------------------------------------------------------------------------------
# Single files


def file_damage(path: str | os.PathLike) -> str | None:
    """Why ``path`` (a weight file) is not whole, or None when its header and length agree (or its format has
    nothing to check). A missing file is for the caller to report (it knows where the file should be)."""
    path = Path(path)
    stat = path.stat()
    return _file_damage(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _file_damage(path: str, size: int, _mtime_ns: int) -> str | None:
    suffix = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as handle:
            start = handle.read(64)
            if size == 0:
                return "empty: 0 bytes"
            if start.startswith(LFS_POINTER_PREFIX):
                return (f"a Git LFS pointer ({_bytes(size)}), not the weights: the download fetched the "
                        "placeholder only")
            handle.seek(0)
            if suffix in SAFETENSORS_SUFFIXES:
                return _safetensors_damage(handle, size)
            if suffix == ".gguf":
                return _gguf_damage(handle, size)
            if suffix in PICKLE_SUFFIXES and start.startswith(b"PK"):
                return _zip_damage(path, size)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return None


def _safetensors_damage(handle, size: int) -> str | None:
    """A safetensors file is ``u64 header length | JSON header | tensor bytes``; the header gives every tensor's
    byte range, and the file ends where the last one does."""
    if size < 8:
        return f"incomplete or damaged: {_bytes(size)}, cut off inside its header"
    (header_length,) = struct.unpack("<Q", handle.read(8))
    if header_length > MAX_SAFETENSORS_HEADER:
        return f"damaged: not a safetensors file (its first bytes announce a {header_length:,}-byte header)"
    if size < 8 + header_length:
        return f"incomplete or damaged: {_bytes(size)}, cut off inside its header"
    try:
        header = json.loads(handle.read(header_length))
    except (UnicodeDecodeError, ValueError):
        return "damaged: its safetensors header is not valid JSON"
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return "damaged: its safetensors header does not describe tensors"
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        return _short(size, expected)
    if size > expected:
        return f"damaged: {_bytes(size)} where its header describes {_bytes(expected)}"
    return None


class _Truncated(Exception):
    pass


class _Reader:
    """Sequential little-endian reads from a file that raise :class:`_Truncated` at its end."""

    def __init__(self, handle):
        self.handle = handle

    def take(self, count: int) -> bytes:
        data = self.handle.read(count)
        if len(data) != count:
            raise _Truncated
        return data

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u64())


def _gguf_damage(handle, size: int) -> str | None:
    """GGUF (v2/v3): header, key/value metadata, tensor infos (name, shape, type, offset), then the tensor data,
    which starts at the next multiple of ``general.alignment`` and ends where the last tensor does."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

    fixed = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
             GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1,
             GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
    read = _Reader(handle)

    def value(kind: int):
        kind = GGUFValueType(kind)
        if kind == GGUFValueType.STRING:
            return read.string()
        if kind == GGUFValueType.ARRAY:
            item, count = read.u32(), read.u64()
            if GGUFValueType(item) in fixed:
                read.take(fixed[GGUFValueType(item)] * count)
            else:
                for _ in range(count):
                    value(item)
            return None
        data = read.take(fixed[kind])
        return int.from_bytes(data, "little") if kind in (GGUFValueType.UINT32, GGUFValueType.UINT64) else None

    try:
        if read.take(4) != GGUF_MAGIC:
            return "damaged: not a GGUF file (it does not start with 'GGUF')"
        version = read.u32()
        if version < 2:
            return None  # GGUF v1 (32-bit counts) predates every diffusion GGUF; nothing to check
        tensors, entries = read.u64(), read.u64()
        alignment = GGUF_DEFAULT_ALIGNMENT
        for _ in range(entries):
            key = read.string()
            found = value(read.u32())
            if key == b"general.alignment" and isinstance(found, int) and found > 0:
                alignment = found
        end = 0
        for _ in range(tensors):
            read.string()
            dims = [read.u64() for _ in range(read.u32())]
            kind, offset = read.u32(), read.u64()
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            elements = 1
            for dim in dims:
                elements *= dim
            end = max(end, offset + elements // block * type_size)
        header_end = handle.tell()
    except _Truncated:
        return f"incomplete or damaged: {_bytes(size)}, cut off inside its header"
    except (ValueError, KeyError):
        return "damaged: its GGUF header names an unknown value or tensor type"
    data_start = -(-header_end // alignment) * alignment
    expected = data_start + end
    if size < expected:
        return _short(size, expected)
    return None


def _zip_damage(path: str, size: int) -> str | None:
    """``torch.save`` writes a zip archive, whose end record closes the file: a file cut short has lost it.
    (Older pickle-only files carry no length to check.)"""
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"incomplete or damaged: {_bytes(size)}, its zip end record is missing (cut short?)"


# --------------------------------------------------------------------------------------------------------------
# Diffusers folders


def component_library(folder: Path, component: str) -> str | None:
    """``diffusers`` or ``transformers`` for a component, from ``model_index.json`` (else from its config)."""
    try:
        entry = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get(component)
        if isinstance(entry, list) and entry and entry[0] in SINGLE_WEIGHT_FILE:
            return entry[0]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        config = json.loads((folder / component / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if "_diffusers_version" in config or "_class_name" in config:
        return "diffusers"
    if "architectures" in config or "model_type" in config:
        return "transformers"
    return None


def listed_components(folder: Path) -> set[str]:
    """Components ``model_index.json`` names (empty when it is missing or unreadable)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]}


def expected_weight_files(folder: Path, component: str) -> tuple[list[str], str]:
    """The weight files a component sub-folder must hold, and where that list comes from.

    An index (``*.safetensors.index.json``, or a ``.bin`` one when that is what the folder has) names its
    shards; otherwise the library's single file, or its legacy ``.bin`` if only that is present."""
    sub = folder / component
    indexes = list(sub.glob("*.index.json")) if sub.is_dir() else []
    # safetensors before .bin; model.safetensors.index.json (3 dots) before variants such as *.fp16.*
    for index in sorted(indexes, key=lambda p: (".safetensors." not in p.name, p.name.count(".") != 3, p.name)):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return sorted(set(weight_map.values())), index.name
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    library = component_library(folder, component) or "diffusers"
    single, legacy = SINGLE_WEIGHT_FILE[library], LEGACY_WEIGHT_FILE[library]
    if not (sub / single).is_file() and (sub / legacy).is_file():
        return [legacy], f"a {library} model folder"
    return [single], f"a {library} model folder"


def folder_damage(folder: str | os.PathLike, components) -> list[Damage]:
    """What is missing or broken in the diffusers ``folder`` for the given ``components`` (sub-folder names).

    A component is checked when its sub-folder exists or ``model_index.json`` lists it: a listed component
    without its sub-folder is missing; a sub-folder needs its ``config.json`` and every expected weight file,
    each whole (:func:`file_damage`)."""
    folder = Path(folder)
    listed = listed_components(folder)
    found: list[Damage] = []
    for component in components:
        sub = folder / component
        if not sub.is_dir():
            if component in listed:
                found.append(Damage(sub, "missing: model_index.json lists this component"))
            continue
        if not (sub / "config.json").is_file():
            found.append(Damage(sub / "config.json", "missing"))
        names, source = expected_weight_files(folder, component)
        for name in names:
            path = sub / name
            if not path.is_file():
                found.append(Damage(path, f"missing, expected by {source}"))
                continue
            problem = file_damage(path)
            if problem:
                found.append(Damage(path, problem))
    return found
