"""Stage 4, export: the finished pairs as two datasets under ``outputs/dataset/``.

* ``kontext/`` — the Kontext-inpaint trainer's layout (``source_images/``, ``target_images/``,
  ``masks/``, ``instructions.jsonl``), ready for ``scripts/train_kontext_inpaint.py --data``. The
  trainer needs sides that are multiples of 16 and one size per pair, so each pair is centre-cropped
  to the largest multiple of ``export.size_multiple`` (the crop is recorded in the metadata).
* ``hf/`` — a Hugging Face ``imagefolder`` tree: ``train/`` and ``validation/`` with the edited
  picture as ``file_name`` and the source and mask beside it (``source_file_name``,
  ``mask_file_name``), plus instruction, category and id, in ``metadata.jsonl``.

The split is by sample id (a hash of the id against ``export.validation_percent``), so a sample's
pairs never straddle the split and the split does not change between runs or when samples are added.
The whole export is built in a hidden sibling folder and swapped into place, so ``dataset/`` is
always either the previous complete export or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import imaging


def split_of(sample_id: str, validation_percent: float) -> str:
    bucket = int(hashlib.sha256(sample_id.encode("utf-8")).hexdigest()[:8], 16) % 10000
    return "validation" if bucket < validation_percent * 100 else "train"


def _crop(array: np.ndarray, multiple: int) -> tuple[np.ndarray, list[int]]:
    h, w = array.shape[:2]
    nh, nw = h - h % multiple, w - w % multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return array[top:top + nh, left:left + nw], [left, top, nw, nh]


def build(pairs: list[dict], out_root: Path, export: dict) -> dict:
    """Write both layouts for ``pairs`` (dicts with source/edit/mask paths, instruction, category, id, pair)."""
    final = out_root / "dataset"
    staging = out_root / f".dataset-building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    multiple = int(export["size_multiple"])
    counts = {"train": 0, "validation": 0, "skipped_too_small": 0}
    kontext_lines, hf_lines = [], {"train": [], "validation": []}
    for pair in pairs:
        source, edit = imaging.load_rgb(Path(pair["source"])), imaging.load_rgb(Path(pair["edit"]))
        if source.shape != edit.shape:
            continue  # a failed size check; never exported (the trainer needs one size per pair)
        mask = imaging.load_mask(Path(pair["mask"])) if pair.get("mask") else np.ones(source.shape[:2], np.float32)
        source_c, crop = _crop(source, multiple)
        if source_c.size == 0:
            counts["skipped_too_small"] += 1
            continue
        edit_c, mask_c = _crop(edit, multiple)[0], _crop(mask, multiple)[0]
        stem = pair["item"].replace("#", "_")
        files = {
            staging / "kontext" / "source_images" / f"{stem}.png": source_c,
            staging / "kontext" / "target_images" / f"{stem}.png": edit_c,
            staging / "kontext" / "masks" / f"{stem}.png": mask_c,
        }
        split = split_of(pair["id"], export["validation_percent"])
        hf = staging / "hf" / split
        files.update({hf / f"{stem}_edit.png": edit_c, hf / f"{stem}_source.png": source_c,
                      hf / f"{stem}_mask.png": mask_c})
        for path, array in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(imaging.png_bytes(array))
        meta = {"instruction": pair["instruction"], "category": pair["category"], "id": pair["id"], "crop": crop}
        kontext_lines.append({"stem": stem, **meta})
        hf_lines[split].append({"file_name": f"{stem}_edit.png", "source_file_name": f"{stem}_source.png",
                                "mask_file_name": f"{stem}_mask.png", **meta})
        counts[split] += 1
    (staging / "kontext").mkdir(parents=True, exist_ok=True)
    (staging / "kontext" / "instructions.jsonl").write_text(
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in kontext_lines), encoding="utf-8")
    for split, lines in hf_lines.items():  # an empty split still gets its (empty) metadata.jsonl
        (staging / "hf" / split).mkdir(parents=True, exist_ok=True)
        (staging / "hf" / split / "metadata.jsonl").write_text(
            "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    (staging / "summary.json").write_bytes(json.dumps(counts).encode())  # the whole folder is swapped in at once
    _swap(staging, final)
    return counts


def _swap(staging: Path, final: Path) -> None:
    """Replace ``final`` with ``staging``; the old export is kept until the new one is in place."""
    old = final.with_name(f".dataset-old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(out_root: Path) -> None:
    """After a kill: drop half-built exports; if the swap was cut between its two renames, restore the old one."""
    for leftover in out_root.glob(".dataset-building-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    olds = sorted(out_root.glob(".dataset-old-*"))
    if olds and not (out_root / "dataset").exists():
        os.replace(olds.pop(), out_root / "dataset")
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
