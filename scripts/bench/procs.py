"""Fresh-process measurements: loading memory, and workflows through ComfyUI's real executor.

Both run a child Python (``python -m scripts.bench.procs <job> <json>``) so that one measurement's
memory, imports or ComfyUI's global state never leak into another, and print one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .harness import ROOT, pack_module


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc (ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS


def child(job: str, payload: dict, python: str | None = None) -> dict:
    """Run ``job`` of this module in a fresh process and return its JSON report."""
    out = subprocess.run([python or sys.executable, "-m", "scripts.bench.procs", job, json.dumps(payload)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child '{job}' failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Loading memory


def load_job(payload: dict) -> dict:
    """Load one transformer file through EditKit's loader of ``family``; memory above the RSS after imports."""
    family, path = payload["family"], Path(payload["path"])
    loading = pack_module({"flux": "pipelines.flux.loading", "qwen": "pipelines.qwen_image.loading",
                           "zimage": "pipelines.zimage.loading"}[family])
    import diffusers  # noqa: F401  (imported before the baseline so it is not counted as loading)
    import gguf  # noqa: F401

    storage = {"bf16": torch.bfloat16, None: None}[payload.get("storage")]
    baseline = status_bytes("VmRSS")
    started = time.perf_counter()
    component = loading.transformer_source(None, path, torch.float32, storage=storage).get()
    seconds = time.perf_counter() - started
    after = status_bytes("VmRSS") - baseline
    peak = status_bytes("VmHWM") - baseline
    state = component.module.state_dict().values()
    weights = sum(t.numel() * t.element_size() for t in state)
    for tensor in state:  # fault in memory-mapped pages: what a first forward would do
        torch.Tensor.as_subclass(tensor, torch.Tensor).reshape(-1).view(torch.uint8).max()
    return {"load_s": seconds, "weights_bytes": weights, "rss_after_load": after, "peak_rss_load": peak,
            "rss_resident": status_bytes("VmRSS") - baseline, "file_bytes": path.stat().st_size}


# --------------------------------------------------------------------------------------
# ComfyUI's executor


def comfy_job(payload: dict) -> dict:
    """Inside ComfyUI's Python: run ``payload['setups']`` (label -> API prompt) alternately, one warm-up
    run each then ``runs`` timed runs; seconds per step are the median interval between consecutive
    progress updates of the sampler (``steps`` total), peak RSS per run (VmHWM reset before each)."""
    root = payload["comfyui"]
    sys.path.insert(0, root)
    saved = sys.argv
    sys.argv = [str(Path(root) / "main.py"), "--cpu", "--disable-api-nodes", *payload.get("flags", [])]
    try:  # ComfyUI reads its command line once, when comfy.cli_args is first imported
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = saved
    from comfy_inprocess import ComfyInProcess

    from . import comfy_nodes

    comfy = ComfyInProcess.get(root)
    import nodes

    nodes.NODE_CLASS_MAPPINGS.update(comfy_nodes.NODES)
    comfy.use_models(Path(payload["models"]))
    stamps: list[tuple[float, int]] = []
    sys.modules["comfy.utils"].set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: stamps.append((time.perf_counter(), total)))
    steps, setups = payload["steps"], payload["setups"]
    results = {label: {"s_per_step": [], "peak_rss": [], "first_run_s": None} for label in setups}
    for run in range(payload["runs"] + 1):
        labels = list(setups) if run % 2 == 0 else list(reversed(setups))
        for label in labels:
            stamps.clear()
            before = status_bytes("VmRSS")
            reset_peak_rss()
            started = time.perf_counter()
            outcome = comfy.run(setups[label])
            if not outcome.success:
                raise RuntimeError(f"{label}: {outcome.error()}")
            if run == 0:  # warm-up: loads the models (and compiles, where a setup compiles)
                results[label]["first_run_s"] = time.perf_counter() - started
                continue
            marks = [t for t, total in stamps if total == steps]
            results[label]["s_per_step"].append(statistics.median(b - a for a, b in zip(marks, marks[1:])))
            results[label]["peak_rss"].append(status_bytes("VmHWM") - before)
    return results


def comfyui_root() -> Path | None:
    root = os.environ.get("COMFYUI_ROOT")
    return Path(root) if root and (Path(root) / "execution.py").is_file() else None


if __name__ == "__main__":
    import importlib

    job, argument = sys.argv[1], json.loads(sys.argv[2])
    if ":" in job:  # "module:function" of this package, e.g. "redux:memory_job"
        module, function = job.split(":")
        run = getattr(importlib.import_module(f"scripts.bench.{module}"), function)
    else:
        run = {"load": load_job, "comfy": comfy_job}[job]
    print(json.dumps(run(argument)))
