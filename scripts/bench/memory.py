"""Memory of EditKit's loaders on real-shape random-weight files, in every format users download (issue 17, item 7).

For each family (``--family``; default all) writes the model with random weights at real width and ``--layers``
blocks (``--layers 0``: the real depth) in the formats users download, streamed tensor by tensor
(:mod:`scripts.bench.real_files`: a 20B model is never held in memory to be written), then loads each file in a
fresh process (so one load's allocator state never colours the next) and prints:

* load time;
* load peak RSS / file bytes (``VmHWM`` growth over the process before loading);
* resident / file bytes (RSS growth once loaded and every weight read once, as a sampling step does);
* ComfyUI's ``model_size()`` (its formula: bytes of the state dict) / bytes really held (RSS growth);
* RSS after freeing (the component dropped, ``gc.collect()``), above the baseline before loading.

Families and formats (issue 17: "at least Z-Image 6B in all formats, FLUX.1 12B fp8 and GGUF, Qwen-Image 20B
GGUF Q4, Qwen2.5-VL 7B fp8"): ``zimage`` (ComfyUI bf16, ComfyUI scaled fp8, GGUF Q8_0, GGUF Q4_K, diffusers
folder), ``flux`` (scaled fp8, Q8_0, Q4_K), ``qwen`` (Q4_K), ``qwen_vl`` (scaled fp8). Targets: resident <= 1.05x
the file for fp8 and GGUF, load peak <= 1.15x, after free <= baseline + 5 %. Run::

    python scripts/bench/memory.py --out /tmp/editkit-mem                          # 3 blocks of each family
    python scripts/bench/memory.py --out /tmp/editkit-mem --layers 0 --family zimage  # the real 6B model
    python scripts/bench/memory.py --out /tmp/editkit-mem --layers 0 --delete       # all, real size, one at a time

Full size needs up to ~13 GB of disk per file (``--delete`` removes each file once measured) and RAM for the
largest file plus its load peak. Compute dtype is bf16 (``--dtype``) so bf16 files are not widened to fp32 by
the choice itself. Never run from the tests: it writes gigabytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# run as a script, this folder is sys.path[0], and its gguf.py would shadow the gguf library
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]  # bench.*, packload; the tests' key converters

def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def measure(family_name: str, fmt: str, path: Path, dtype_name: str) -> dict:
    """One load in this process (called in a fresh child by :func:`main`)."""
    import torch

    from packload import load_pack, offline

    offline()
    load_pack()
    import diffusers  # noqa: F401  (the model classes' imports are not the model's memory)
    import transformers  # noqa: F401

    from bench.real_files import FAMILIES

    family = FAMILIES[family_name]
    dtype = getattr(torch, dtype_name)
    family.warm_imports()
    gc.collect()
    base_rss, base_peak = _status("VmRSS"), _status("VmHWM")
    start = time.perf_counter()
    if fmt == "diffusers_folder":
        component = family.load(path, None, dtype)
    else:
        component = family.load(None, path, dtype)
    seconds = time.perf_counter() - start
    module = getattr(component, "module", component)
    with torch.no_grad():  # read every weight once, as a sampling step does: mapped pages become resident
        for tensor in module.state_dict().values():
            torch.Tensor(tensor).reshape(-1).view(torch.uint8)[::4096].sum()
        del tensor  # one live tensor of a mapped file would keep the whole mapping
    gc.collect()
    rss, peak = _status("VmRSS"), _status("VmHWM")
    model_size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in module.parameters()})
    del component, module
    gc.collect()
    after_free = _status("VmRSS")
    file_bytes = _size(path)
    held = rss - base_rss
    return {"format": fmt, "file_GB": file_bytes / 1e9, "load_s": seconds,
            "peak_over_file": (max(peak, base_peak) - base_rss) / file_bytes, "resident_over_file": held / file_bytes,
            "model_size_over_held": model_size / held if held > 0 else float("nan"),
            "after_free_over_baseline": after_free / base_rss - 1, "param_dtypes": dtypes}


def main(argv=None) -> int:
    from bench.real_files import FAMILIES, write
    from packload import load_pack, offline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the files are written (kept for reruns)")
    parser.add_argument("--family", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--layers", type=int, default=3, help="blocks of each model (0 = the real depth)")
    parser.add_argument("--formats", nargs="*", help="only these formats (default: each family's list)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype asked of the loader")
    parser.add_argument("--delete", action="store_true", help="delete each file once measured (full size: disk)")
    parser.add_argument("--measure", nargs=3, metavar=("FAMILY", "FORMAT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], Path(args.measure[2]), args.dtype)))
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    offline()
    load_pack()  # the family converters import the pack (editkit.*)
    for name in args.family:
        family = FAMILIES[name]
        depth = args.layers or family.full_depth
        print(f"\n{family.title}: real width, {depth} blocks{' (the real depth)' if not args.layers else ''}, "
              f"compute {args.dtype}")
        print(f"{'format':18} {'file GB':>8} {'load s':>7} {'peak/file':>9} {'resident/file':>13} "
              f"{'model_size/held':>15} {'free vs base':>12}  stored as")
        for fmt in family.formats:
            if args.formats and fmt not in args.formats:
                continue
            path = write(family, fmt, args.out, args.layers or None)
            done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--dtype", args.dtype,
                                   "--measure", name, fmt, str(path)], capture_output=True, text=True, env=env)
            if args.delete:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if done.returncode != 0:
                print(f"{fmt:18} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{fmt:18} {r['file_GB']:8.2f} {r['load_s']:7.1f} {r['peak_over_file']:9.2f} "
                  f"{r['resident_over_file']:13.2f} {r['model_size_over_held']:15.2f} "
                  f"{r['after_free_over_baseline']:+11.1%}  {','.join(r['param_dtypes'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
