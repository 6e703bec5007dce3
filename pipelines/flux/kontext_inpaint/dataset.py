"""Edit-pair datasets for the Kontext-inpaint fine-tune: scanning, validation and the latent cache.

A dataset folder holds ``source_images/`` and ``target_images/`` matched by file stem, an
optional ``masks/`` (white = may change; a pair without a mask gets a pure white one, the same
default as the sampler's) and one instruction per pair, either in ``<stem>.txt`` (inside
``instructions/``, ``target_images/`` or ``source_images/``) or in one ``instructions.jsonl``
(``{"stem": ..., "instruction": ...}`` per line).

Everything is checked before anything is written or trained, and every problem names the file
and the fix, because a 12B fine-tune that stops after an hour on a bad image wastes the hour.
The VAE and text encoders run once per pair; their outputs are cached per pair as safetensors
keyed by a fingerprint of the pair's files, instruction and encoders, so the training loop
holds neither model and re-runs skip the encoding. Input folders are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...core.errors import EditKitError
from ...core.loading import LazyModel
from ...core.runtime import Runtime
from .. import vae as vae_ops
from .conditioning import mask_image_latent

log = logging.getLogger("EditKit.train")

SOURCE_DIR = "source_images"
TARGET_DIR = "target_images"
MASK_DIR = "masks"
INSTRUCTION_DIR = "instructions"
INSTRUCTIONS_JSONL = "instructions.jsonl"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SIZE_MULTIPLE = 16
CACHE_FORMAT = "editkit-kontext-cache-1"
_MAX_REPORTED = 5


@dataclass(frozen=True)
class EditPair:
    """One validated training example: files, instruction and its (shared) pixel size."""

    stem: str
    source: Path
    target: Path
    mask: Path | None
    instruction: str
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


# --------------------------------------------------------------------------------------
# Scanning and validation


def _image_files(folder: Path, problems: list[str], required: bool) -> dict[str, Path]:
    """Image files of ``folder`` by stem; other files are reported (``.txt`` instructions excepted)."""
    if not folder.is_dir():
        if required:
            problems.append(f"Missing folder '{folder}': put the {folder.name.replace('_', ' ')} there.")
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir() or path.suffix.lower() == ".txt":
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append(f"'{path}' is not a supported image ({', '.join(IMAGE_EXTENSIONS)}): convert or remove it.")
            continue
        if path.stem in found:
            problems.append(f"'{found[path.stem]}' and '{path}' share the stem '{path.stem}': keep one of them.")
            continue
        found[path.stem] = path
    return found


_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied, as ComfyUI's Load Image does), after a decode check."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()  # must come first: Pillow cannot verify a file it has started to read
        with Image.open(path) as image:
            width, height = image.size
            size = (height, width) if image.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSED else (width, height)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise EditKitError(f"Cannot read the image '{path}' ({exc}). Replace it with a valid PNG or JPEG.") from exc
    return size


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise EditKitError(f"Cannot read the instruction file '{path}' ({exc}). Save it as UTF-8 text.") from exc


def _jsonl_instructions(path: Path, stems: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EditKitError(f"Cannot read '{path}' ({exc}). Save it as UTF-8 JSON Lines.") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"'{path}' line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EditKitError(f"{where} is not valid JSON ({exc.msg}).") from exc
        if not isinstance(entry, dict) or not isinstance(entry.get("stem"), str) \
                or not isinstance(entry.get("instruction"), str):
            raise EditKitError(f'{where} must be an object like {{"stem": "0001", "instruction": "make it night"}}.')
        stem = entry["stem"]
        if stem not in stems:
            raise EditKitError(f"{where} names the stem '{stem}', but source_images/ has no such image.")
        if stem in out:
            raise EditKitError(f"{where} repeats the stem '{stem}': give one instruction per pair.")
        out[stem] = entry["instruction"].strip()
    return out


def _instructions(data_dir: Path, stems: list[str], jsonl: Path | None) -> dict[str, str]:
    """The instruction of every stem; a stem with two different instructions is an error."""
    if jsonl is None and (data_dir / INSTRUCTIONS_JSONL).is_file():
        jsonl = data_dir / INSTRUCTIONS_JSONL
    if jsonl is not None and not jsonl.is_file():
        raise EditKitError(f"The instructions file '{jsonl}' does not exist: fix data.instructions_file.")
    from_jsonl = _jsonl_instructions(jsonl, set(stems)) if jsonl is not None else {}
    out: dict[str, str] = {}
    problems = []
    for stem in stems:
        texts = {str(jsonl): from_jsonl[stem]} if stem in from_jsonl else {}
        for folder in (INSTRUCTION_DIR, TARGET_DIR, SOURCE_DIR):
            path = data_dir / folder / f"{stem}.txt"
            if path.is_file():
                texts[str(path)] = _read_text(path)
        if len(set(texts.values())) > 1:
            problems.append(f"Pair '{stem}' has different instructions in {', '.join(texts)}: keep one.")
        elif not texts:
            problems.append(f"Pair '{stem}' has no instruction: write it to '{data_dir / INSTRUCTION_DIR}/{stem}.txt' "
                            f"or add it to '{data_dir / INSTRUCTIONS_JSONL}'.")
        elif not next(iter(texts.values())):
            problems.append(f"The instruction of pair '{stem}' ({next(iter(texts))}) is empty: write the edit there.")
        else:
            out[stem] = next(iter(texts.values()))
    _raise_problems(problems)
    return out


def _raise_problems(problems: list[str]) -> None:
    if problems:
        shown = " ".join(problems[:_MAX_REPORTED])
        more = len(problems) - _MAX_REPORTED
        raise EditKitError(shown + (f" ({more} more problems like these.)" if more > 0 else ""))


def _check_sizes(pair_files: dict[str, Path], problems: list[str]) -> tuple[int, int] | None:
    """The common (width, height) of one pair's images, or None after recording what is wrong."""
    sizes = {role: _image_size(path) for role, path in pair_files.items()}
    width, height = sizes["source"]
    ok = True
    for role, (w, h) in sizes.items():
        if w % SIZE_MULTIPLE or h % SIZE_MULTIPLE:
            fix_w, fix_h = (max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE) for side in (w, h))
            problems.append(f"'{pair_files[role]}' is {w}x{h}, but FLUX.1 needs width and height that are multiples "
                            f"of {SIZE_MULTIPLE}: resize or crop it (e.g. to {fix_w}x{fix_h}).")
            ok = False
    for role, (w, h) in sizes.items():
        if ok and (w, h) != (width, height):
            problems.append(f"'{pair_files[role]}' is {w}x{h} but its source '{pair_files['source']}' is "
                            f"{width}x{height}: the source, target and mask of a pair must have the same size, "
                            f"so resize the {role} to {width}x{height}.")
            ok = False
    return (width, height) if ok else None


def scan_dataset(data_dir: str | Path, instructions_file: str | Path | None = None) -> list[EditPair]:
    """Find and validate every pair of ``data_dir`` (sorted by stem); raise one clear error otherwise."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EditKitError(f"The dataset folder '{data_dir}' does not exist: pass the folder that holds "
                           f"{SOURCE_DIR}/ and {TARGET_DIR}/.")
    problems: list[str] = []
    sources = _image_files(data_dir / SOURCE_DIR, problems, required=True)
    targets = _image_files(data_dir / TARGET_DIR, problems, required=True)
    masks = _image_files(data_dir / MASK_DIR, problems, required=False)
    _raise_problems(problems)
    for stem in sorted(set(sources) - set(targets)):
        problems.append(f"Pair '{stem}' has no target: add '{data_dir / TARGET_DIR}/{stem}.png' "
                        f"(or remove '{sources[stem]}').")
    for stem in sorted(set(targets) - set(sources)):
        problems.append(f"Pair '{stem}' has no source: add '{data_dir / SOURCE_DIR}/{stem}.png' "
                        f"(or remove '{targets[stem]}').")
    for stem in sorted(set(masks) - set(sources)):
        problems.append(f"The mask '{masks[stem]}' has no source image with the stem '{stem}': rename or remove it.")
    _raise_problems(problems)
    if not sources:
        raise EditKitError(f"No image pairs in '{data_dir}': put sources in {SOURCE_DIR}/ and targets with the same "
                           f"file names in {TARGET_DIR}/.")
    stems = sorted(sources)
    sizes = {}
    for stem in stems:
        files = {"source": sources[stem], "target": targets[stem]}
        if stem in masks:
            files["mask"] = masks[stem]
        sizes[stem] = _check_sizes(files, problems)
    _raise_problems(problems)
    texts = _instructions(data_dir, stems, Path(instructions_file) if instructions_file else None)
    return [
        EditPair(stem, sources[stem], targets[stem], masks.get(stem), texts[stem], *sizes[stem]) for stem in stems
    ]


# --------------------------------------------------------------------------------------
# The latent / text-embedding cache


@dataclass
class Encoders:
    """What turns a pair into training tensors; loaded only if some cache entry is missing or stale.

    ``identity`` names the encoder weights (paths, sizes, dates) and settings, so a cache made
    with other encoders is never reused.
    """

    vae: LazyModel
    text: LazyModel
    max_sequence_length: int
    identity: str


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pair_fingerprint(pair: EditPair, encoders: Encoders) -> str:
    """Hash of everything a cache entry depends on: file contents, instruction, encoders."""
    parts = [CACHE_FORMAT, encoders.identity, str(encoders.max_sequence_length), pair.instruction,
             _file_digest(pair.source), _file_digest(pair.target),
             _file_digest(pair.mask) if pair.mask is not None else "white"]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def _cached_fingerprint(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("fingerprint")
    except Exception:  # a damaged entry is simply rebuilt
        return None


def _load_pixels(path: Path, mode: str) -> torch.Tensor:
    """``[1,C,H,W]`` float32 in 0..1 (RGB for pictures, L for masks)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            array = np.asarray(ImageOps.exif_transpose(image).convert(mode), dtype=np.float32) / 255.0
    except OSError as exc:
        raise EditKitError(f"Cannot decode the image '{path}' ({exc}). Replace it with a valid PNG or JPEG.") from exc
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def _encode_pair(pair: EditPair, vae, text, runtime: Runtime, max_sequence_length: int) -> dict[str, torch.Tensor]:
    source = vae_ops.encode(vae, _load_pixels(pair.source, "RGB"), runtime)
    target = vae_ops.encode(vae, _load_pixels(pair.target, "RGB"), runtime)
    mask = _load_pixels(pair.mask, "L") if pair.mask is not None else None
    mask_latent = mask_image_latent(vae, mask, 1, pair.height, pair.width, runtime)
    states, pooled = text.encode([pair.instruction], runtime, max_sequence_length)
    tensors = {"source": source, "target": target, "mask": mask_latent, "text": states, "pooled": pooled}
    return {k: v[0].detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


def build_cache(pairs: list[EditPair], cache_dir: Path, encoders: Encoders, runtime: Runtime,
                rank: int = 0, world: int = 1, fingerprints: list[str] | None = None) -> list[Path]:
    """Encode the pairs whose cache entry is missing or stale; return every pair's entry path.

    With several processes each encodes the pairs ``i % world == rank`` (the caller waits for
    all before reading). Entries are written to a temporary name and renamed, so an interrupted
    run never leaves a half-written entry that a later run would trust.
    """
    fingerprints = fingerprints or [pair_fingerprint(p, encoders) for p in pairs]
    paths = [cache_dir / f"{pair.stem}.safetensors" for pair in pairs]
    todo = [i for i in range(rank, len(pairs), world) if _cached_fingerprint(paths[i]) != fingerprints[i]]
    if not todo:
        return paths
    log.info("Encoding %d of %d pairs into the cache %s", len(todo), len(pairs), cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    vae, text = encoders.vae.get(), encoders.text.get()
    for i in todo:
        tensors = _encode_pair(pairs[i], vae, text, runtime, encoders.max_sequence_length)
        partial = paths[i].with_name(f".{paths[i].name}.{os.getpid()}.partial")
        save_file(tensors, str(partial), metadata={"fingerprint": fingerprints[i], "stem": pairs[i].stem})
        os.replace(partial, paths[i])
    return paths


def check_cache(paths: list[Path], fingerprints: list[str]) -> None:
    """Every entry exists and matches its fingerprint (after all processes have written theirs)."""
    for path, expected in zip(paths, fingerprints):
        if _cached_fingerprint(path) != expected:
            raise EditKitError(f"The cache entry '{path}' is missing or stale after encoding. Make sure every "
                               "training process sees the same output folder (a shared file system), then rerun.")


# --------------------------------------------------------------------------------------
# Training batches


class CachedPairs:
    """Cached pairs, read per batch from their safetensors files (memory-mapped, no encoder needed)."""

    KEYS = ("source", "target", "mask", "text", "pooled")

    def __init__(self, paths: list[Path], sizes: list[tuple[int, int]]):
        self.paths = list(paths)
        self.sizes = list(sizes)

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Stacked tensors of the given pairs (all of one size: see :class:`BatchOrder`)."""
        items = []
        for i in indices:
            with safe_open(str(self.paths[i]), framework="pt") as handle:
                items.append({k: handle.get_tensor(k) for k in self.KEYS})
        return {k: torch.stack([item[k] for item in items]) for k in self.KEYS}


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed for one purpose and position (e.g. the noise of micro-batch 17).

    Every random draw of training comes from a seed derived from the run's seed and the step,
    so a resumed run draws exactly what an uninterrupted one would, with no RNG state to carry.
    """
    digest = hashlib.sha256(json.dumps([int(seed), *parts]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchOrder:
    """Which pairs form micro-batch ``m``: shuffled epochs of same-size batches.

    Pairs are grouped by size (a batch must stack), each group is shuffled and cut into
    batches, and the batches of an epoch are shuffled, all from :func:`derive_seed`, so the
    order is a pure function of (seed, m) and resuming needs no sampler state.
    """

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, seed: int):
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            self.groups.setdefault(size, []).append(index)
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = sum(-(-len(members) // batch_size) for members in self.groups.values())
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            batches = []
            for size in sorted(self.groups):
                members = self.groups[size]
                order = torch.randperm(len(members), generator=generator).tolist()
                shuffled = [members[i] for i in order]
                batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
            order = torch.randperm(len(batches), generator=generator).tolist()
            self._epoch = (epoch, [batches[i] for i in order])
        return self._epoch[1]

    def __call__(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.per_epoch)
        return self._batches(epoch)[position]

