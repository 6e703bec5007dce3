"""Measure the dataset factory in mock mode (not a test; prints a table).

    python -m client.dataset.benchmark [--samples 1000] [--size 64]

1. Throughput per stage (samples or pairs per second) on generated samples, one instruction each.
2. QA time per pair (the per-pair checks run inside ``generate``; timed here separately on the same pairs).
3. The manifests' size for 10,000 samples (scaled from the measured bytes per line) and the time to resume
   from 10,000-line manifests (load + decide every item is done).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .. import console
from ..manifest import Manifest
from . import imaging, qa
from .config import load_config
from .stages import Factory


def make_samples(root: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    data = root / "data"
    for i in range(count):
        folder = data / f"类别{i % 5}" / f"{i:05d}"
        folder.mkdir(parents=True)
        coarse = rng.random((4, 4, 3))
        picture = np.kron(coarse, np.ones((size // 4, size // 4, 1)))
        Image.fromarray((picture * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_samples(root, args.samples, args.size)
        config = load_config(None, [f"outputs={root / 'out'}", f"inputs.roots=[{data}]",
                                    "instructions.default=[make the colours warmer]"])
        result = Factory(config, mock_mode=True).run(["ingest", "decompose", "generate", "export", "qa"])
        console.out(f"mock mode, {args.samples} samples of {args.size}x{args.size}, 1 instruction each")
        console.out(f"{'stage':<10} {'items':>7} {'seconds':>9} {'items/s':>9}")
        for stage, t in result["timings"].items():
            console.out(f"{stage:<10} {t['items']:>7} {t['seconds']:>9.2f} {t['items'] / max(t['seconds'], 1e-9):>9.1f}")
        pairs = Manifest(root / "out" / "manifests" / "generate.jsonl").load()
        sample = list(pairs.values())[:200]
        start = time.perf_counter()
        for p in sample:
            mask = imaging.load_mask(Path(p["mask"])) if p["mask"] else None
            qa.check_pair(imaging.load_rgb(Path(p["source"])), imaging.load_rgb(Path(p["edit"])), mask, config["qa"])
        per_pair = (time.perf_counter() - start) / len(sample)
        console.out(f"QA checks per pair (load + 4 checks): {per_pair * 1000:.2f} ms")
        manifests = root / "out" / "manifests"
        scaled = root / "scaled"
        scaled.mkdir()
        total_bytes = 0
        for name in ("ingest", "decompose", "generate"):
            lines = (manifests / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
            template = json.loads(lines[0])
            with open(scaled / f"{name}.jsonl", "w", encoding="utf-8") as handle:
                for i in range(10_000):
                    handle.write(json.dumps({**template, "item": f"{i:05d}"}, ensure_ascii=False) + "\n")
            total_bytes += (scaled / f"{name}.jsonl").stat().st_size
        start = time.perf_counter()
        for name in ("ingest", "decompose", "generate"):
            records = Manifest(scaled / f"{name}.jsonl").load()
            done = sum(1 for r in records.values() if r.get("status") == "done")
            assert done == 10_000
        resume = time.perf_counter() - start
        console.out(f"manifests for 10,000 samples: {total_bytes / 1e6:.1f} MB; loading them to resume: {resume:.2f} s")


if __name__ == "__main__":
    main()
