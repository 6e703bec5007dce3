"""Loading pieces every model family shares: weakly cached models, lazy handles, reading weight files.

Loaded models are shared: loading the same file (or folder: :func:`folder_key`) twice (same size, mtime
and dtype) returns the
model already in memory for as long as anything still uses it; the cache holds weak references
only, so ComfyUI's "free memory" really frees. Loader nodes return :class:`LazyModel` handles,
so a loader output nothing uses never reads its file.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .errors import EditKitError, ModelFileError

# --------------------------------------------------------------------------------------
# Shared, weakly held models


_CACHE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_CACHE_LOCK = threading.Lock()


def file_key(path: Path | None) -> tuple:
    if path is None:
        return (None,)
    if not path.exists():
        return (str(path), None, None)  # the loader reports the missing file when the model is used
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def folder_key(folder: Path | None, *subfolders: str) -> tuple:
    """Identity of a diffusers folder's model: path, size and mtime of every file in ``subfolders`` (or the folder).

    Covers the weight shards (``*.safetensors``, ``*.bin``, ``*.gguf``…) and not only ``config.json``:
    replacing a folder's shards under an unchanged config must load the new weights, never reuse the
    model already in memory (issue 17, fault 7). Hidden entries (``.cache`` of ``huggingface-cli
    download --local-dir``) are skipped. Stat calls only: a few dozen files, microseconds.
    """
    if folder is None:
        return (None,)
    roots = [folder / sub for sub in subfolders] if subfolders else [folder]
    files = []
    for root in roots:
        if root.is_dir():
            files += [p for p in root.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
        else:
            files.append(root)
    return (str(folder.resolve()), *(file_key(p) for p in sorted(files)))


def shared(key: tuple, load: Callable[[], object]):
    """Return the live object cached under ``key`` or load (and cache) a new one."""
    with _CACHE_LOCK:
        found = _CACHE.get(key)
    if found is not None:
        return found
    value = load()
    with _CACHE_LOCK:
        _CACHE[key] = value
    return value


class LazyModel:
    """A model that is loaded the first time a node uses it, then kept by this handle.

    Loader nodes return these, so an unconnected loader output (e.g. the text encoders when
    the prompt comes from a native CLIPTextEncode) never costs memory or load time.
    """

    def __init__(self, key: tuple, load: Callable[[], object], description: str):
        self.key = key
        self.description = description
        self._load = load
        self._value = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._value is None:
                self._value = shared(self.key, self._load)
            return self._value

    def derived(self, tag: str, transform: Callable[[object], object], description: str) -> LazyModel:
        """A handle to ``transform`` applied to a fresh load of this model (never the shared copy).

        Used where a model is modified in place (e.g. widening Fill into Kontext-inpaint), so
        the unmodified model that other nodes may share stays intact.
        """
        return LazyModel((tag, *self.key), lambda: transform(self._load()), description)

    def __repr__(self) -> str:
        state = "loaded" if self._value is not None else "not loaded yet"
        return f"<EditKit {self.description} ({state})>"


def unavailable(description: str, message: str) -> LazyModel:
    """A handle that explains, when first used, why its model cannot be loaded.

    Loader outputs that nothing uses must not fail the loader, so the error waits for a user.
    """

    def fail():
        raise EditKitError(message)

    return LazyModel(("unavailable", message), fail, description)


# --------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: Path, expected: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``/``.sft`` or ``.gguf`` file, with a clear error on failure.

    GGUF tensors are views of a private mapping of the file (core.gguf.read_gguf); quantized ones are
    diffusers ``GGUFParameter`` of packed bytes.
    """
    if not path.is_file():
        raise ModelFileError(path, "Model file not found", expected)
    suffix = path.suffix.lower()
    try:
        if suffix in (".safetensors", ".sft"):
            return safetensors.torch.load_file(str(path), device="cpu")
        if suffix == ".gguf":
            from .gguf import read_gguf  # mapped, not copied (core.gguf)

            return read_gguf(path)
    except Exception as exc:  # corrupt or truncated files surface as many exception types
        raise ModelFileError(path, f"Cannot read the file ({type(exc).__name__}: {exc})", expected) from exc
    raise ModelFileError(path, f"Unsupported file type '{suffix}'", expected)


def cast_stored_weights(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Bring weights stored in a narrower format to ``dtype``, in place.

    fp8-stored weights are cast up; ComfyUI's "scaled fp8" files also store a ``scale_weight``
    per layer (and a ``scaled_fp8`` marker), which must multiply the weight or the model would
    silently run with wrongly scaled weights. Other floating tensors are cast to ``dtype``;
    quantized GGUF tensors (packed bytes, not floating) are left alone.
    """
    for key in [k for k in sd if k == "scaled_fp8" or k.endswith(".scale_input")]:
        del sd[key]
    scales = {k[: -len(".scale_weight")]: sd.pop(k) for k in [k for k in sd if k.endswith(".scale_weight")]}
    for key, tensor in sd.items():
        if not tensor.is_floating_point() or hasattr(tensor, "quant_type"):
            continue
        if tensor.element_size() == 1:
            tensor = tensor.float()
            scale = scales.get(key[: -len(".weight")]) if key.endswith(".weight") else None
            if scale is not None:
                tensor = tensor * scale.float()
        sd[key] = tensor.to(dtype)
    return sd


def strip_prefix(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``sd`` without the first of ``prefixes`` its keys carry (ComfyUI's ``model.diffusion_model.``)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


_HEADER_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def stored_float_dtype(source: Path | None) -> torch.dtype | None:
    """The dtype most of a ``.safetensors`` file's (or a folder's first shard's) floating bytes are stored in.

    Read from the header only (no weights). None for GGUF, fp8-mostly files, anything unreadable: callers then
    keep their own choice. Used for ``auto`` precision: a bf16 file stays bf16 in memory on a device that
    computes in fp32 (issue 17: storage keeps the file's precision).
    """
    if source is None:
        return None
    if source.is_dir():
        shards = sorted(source.glob("*.safetensors"))
        if not shards:
            return None
        source = shards[0]
    if source.suffix.lower() not in (".safetensors", ".sft") or not source.is_file():
        return None
    try:
        with safetensors.safe_open(str(source), framework="pt") as handle:
            totals: dict[str, int] = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                count = 1
                for side in piece.get_shape():
                    count *= side
                name = piece.get_dtype()
                totals[name] = totals.get(name, 0) + count
    except Exception:  # damaged files are reported by the loader that reads them
        return None
    if not totals:
        return None
    return _HEADER_DTYPES.get(max(totals, key=totals.get))


def count_blocks(keys, prefix: str) -> int:
    """How many numbered blocks ``<prefix><i>.`` the keys hold (highest index + 1): the depth a file reveals."""
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def scheduler_config(folder: Path | None, shipped: Path) -> dict:
    """A diffusers folder's scheduler config, or the family's ``shipped`` one when loading from single files."""
    if folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
        return read_json(folder / "scheduler" / "scheduler_config.json")
    return read_json(shipped)
