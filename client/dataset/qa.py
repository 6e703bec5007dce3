"""Stage 5, qa: per-pair checks that can fail, duplicates across samples, and the JSON + HTML reports.

Per pair (computed as soon as an edit exists, so export can leave failures out):

* ``size`` — the edit has the source's width and height;
* ``blank`` — the edit is not (nearly) one flat colour (greyscale std below ``qa.blank_std``);
* ``near_copy`` — the edit is not the source again (perceptual-hash distance above
  ``qa.near_copy_distance`` or, when the hashes agree, pixels inside the mask actually changed);
* ``outside_mask`` — the edit changed nothing its mask did not allow: PSNR ≥ ``qa.min_psnr_outside_mask``
  and SSIM ≥ ``qa.min_ssim_outside_mask`` (skipped without a mask).

The mask rule is the edit's own. FLUX.1-Fill (ComfyUI's convention) repaints wherever the mask is above
0 and blends its result in with the soft mask, ``edit = source·(1 - m) + generated·m``, so a pixel may
differ from the source by at most ``m``. The outside check therefore measures only the change beyond
that allowance (:func:`imaging.beyond_mask`), weighting each pixel by how far outside it is (``1 - m``):
pixels with mask 0 count fully, soft pixels partly, pixels with mask 1 not at all. A decomposed layer
with soft alpha (anti-aliased edges, semi-transparent regions) passes when the edit kept to it, and an
edit that leaked outside fails.

Across samples: sources whose perceptual hashes are within ``qa.duplicate_distance`` are reported as
duplicates. Ingest problems (naming, unreadable, duplicate ids, empty categories, instructions) are
listed too. Reports go to ``outputs/reports/qa/``: ``report.json`` and ``report.html`` (thumbnails of
source / mask / edit side by side, filters by category and failed check, summary counts).
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_write
from . import imaging

PAIR_CHECKS = ("size", "blank", "near_copy", "outside_mask")


def check_pair(source: np.ndarray, edited: np.ndarray, mask: np.ndarray | None, qa: dict) -> dict:
    """Each check's result ``{"ok": bool, ...measurements}`` for one source/edit pair."""
    checks: dict[str, dict] = {}
    same_size = source.shape[:2] == edited.shape[:2]
    checks["size"] = {"ok": bool(same_size), "source": list(source.shape[1::-1]), "edit": list(edited.shape[1::-1])}
    std = float(imaging.grey(edited).std())
    checks["blank"] = {"ok": bool(std >= qa["blank_std"]), "std": round(std, 5)}
    distance = imaging.hamming(imaging.phash(source), imaging.phash(edited))
    fits = mask is not None and mask.shape == source.shape[:2]
    changed = True
    if same_size:
        inside = mask > 0 if fits else np.ones(source.shape[:2], bool)  # the edit's rule: above 0 is inside
        changed = bool(np.abs(edited - source)[inside].max(initial=0.0) > 2.0 / 255.0)
    checks["near_copy"] = {"ok": bool(distance > qa["near_copy_distance"] or changed), "phash_distance": distance,
                           "changed_inside": changed}
    if not fits or not same_size:
        checks["outside_mask"] = {"ok": True, "skipped": "no mask of the picture's size" if same_size else "size"}
    else:
        kept = imaging.beyond_mask(source, edited, mask)
        weights = 1.0 - np.clip(mask, 0.0, 1.0)
        p, s = imaging.psnr(source, kept, weights), imaging.ssim(source, kept, weights)
        checks["outside_mask"] = {"ok": bool(p >= qa["min_psnr_outside_mask"] and s >= qa["min_ssim_outside_mask"]),
                                  "psnr": None if p == float("inf") else round(p, 3), "ssim": round(s, 5)}
    return checks


def duplicates(hashes: dict[str, int], distance: int) -> list[list[str]]:
    """Groups of sample ids whose source hashes lie within ``distance`` of each other."""
    ids = sorted(hashes)
    parent = {i: i for i in ids}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a_index, a in enumerate(ids):
        for b in ids[a_index + 1:]:
            if imaging.hamming(hashes[a], hashes[b]) <= distance:
                parent[root(b)] = root(a)
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def thumbnail(path: Path, size: int) -> bytes:
    with Image.open(path) as picture:
        picture = picture.convert("RGB")
        picture.thumbnail((size, size))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=80)
        return buffer.getvalue()


def write_reports(out_dir: Path, report: dict, rows: list[dict], thumb_size: int) -> tuple[Path, Path]:
    """``report.json`` and ``report.html`` (with thumbnails) under ``out_dir``, each written atomically."""
    thumbs = out_dir / "thumbs"
    written = set()
    for row in rows:
        row["thumbs"] = {}
        for role in ("source", "mask", "edit"):
            path = row.get(role)
            if path and Path(path).is_file():
                name = f"{row['pair']}_{role}.jpg".replace("/", "_").replace("#", "_")
                atomic_write(thumbs / name, thumbnail(Path(path), thumb_size), out_dir)
                row["thumbs"][role] = f"thumbs/{name}"
                written.add(name)
    for old in thumbs.glob("*") if thumbs.is_dir() else []:
        if old.name not in written:  # thumbnails of pairs that are gone
            old.unlink()
    json_path = atomic_write(out_dir / "report.json",
                             json.dumps(report, ensure_ascii=False, indent=1).encode("utf-8"), out_dir)
    html_path = atomic_write(out_dir / "report.html", _html(report, rows).encode("utf-8"), out_dir)
    return json_path, html_path


def _thumb_cell(row: dict, role: str) -> str:
    src = row["thumbs"].get(role)
    return f'<td><img src="{html.escape(src)}" alt="{role}"></td>' if src else "<td>–</td>"


def _html(report: dict, rows: list[dict]) -> str:
    esc = html.escape
    categories = sorted({r["category"] for r in rows} | {i["category"] for i in report["issues"] if i["category"]})
    summary = report["summary"]
    counts = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in summary.items())
    cat_options = "".join(f'<option value="{esc(c)}">{esc(c)}</option>' for c in categories)
    check_options = "".join(f'<option value="{c}">{c}</option>' for c in PAIR_CHECKS)
    body = []
    for r in rows:
        failed = [c for c, v in r["checks"].items() if not v["ok"]]
        cells = "".join(_thumb_cell(r, role) for role in ("source", "mask", "edit"))
        checks = " ".join(f'<span class="{"ok" if v["ok"] else "bad"}" title="{esc(json.dumps(v))}">{c}</span>'
                          for c, v in r["checks"].items())
        body.append(f'<tr data-category="{esc(r["category"])}" data-failed="{" ".join(failed)}">'
                    f'<td>{esc(r["category"])}</td><td>{esc(r["id"])}</td><td>{esc(r["instruction"])}</td>'
                    f'{cells}<td>{checks}</td></tr>')
    issues = "".join(f'<tr data-category="{esc(i["category"])}" data-failed="{esc(i["check"])}"><td>'
                     f'{esc(i["check"])}</td><td>{esc(i["category"])}</td><td>{esc(i["path"])}</td>'
                     f'<td>{esc(i["message"])}</td></tr>' for i in report["issues"])
    dup = "".join(f"<li>{esc(', '.join(g))}</li>" for g in report["duplicates"])
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>EditKit dataset QA</title>
<style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px;vertical-align:top}}img{{max-width:160px}}.ok{{color:#161}}.bad{{color:#b11;font-weight:bold}}
</style></head><body><h1>Dataset QA report</h1><ul id="summary">{counts}</ul>
<p>Category <select id="category"><option value="">all</option>{cat_options}</select>
Failed check <select id="check"><option value="">any</option><option value="*">failed any</option>
{check_options}</select></p>
<h2>Pairs</h2><table id="pairs"><tr><th>category</th><th>id</th><th>instruction</th><th>source</th><th>mask</th>
<th>edit</th><th>checks</th></tr>{"".join(body)}</table>
<h2>Ingest issues</h2><table id="issues"><tr><th>check</th><th>category</th><th>path</th><th>message</th></tr>
{issues}</table><h2>Duplicate sources</h2><ul>{dup or "<li>none</li>"}</ul>
<script>
function apply(){{const c=document.getElementById('category').value,k=document.getElementById('check').value;
document.querySelectorAll('tr[data-category]').forEach(r=>{{const f=r.dataset.failed.split(' ').filter(x=>x);
const okc=!c||r.dataset.category===c,okk=!k||(k==='*'?f.length>0:f.includes(k));
r.style.display=okc&&okk?'':'none';}});}}
document.getElementById('category').onchange=apply;document.getElementById('check').onchange=apply;
</script></body></html>
"""
