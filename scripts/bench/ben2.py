"""BEN2 Base (full-size network, random weights): seconds per batch, pictures per second and peak memory
at 1024² (``--size`` when given other than the default 512), batch 1 and 4; each case in a fresh process
so its peak RSS is its own. Timing covers the real inference path (``predict_masks``: normalisation, the
network, mask resize, host copy) on inputs already at the processing resolution."""

from __future__ import annotations

import time

import torch

from . import procs
from .harness import Settings, pack_module, print_table, sync

PARTS = ("batches",)


def case_job(case: dict) -> dict:
    ben2 = pack_module("pipelines.ben2")
    runtime_mod = pack_module("pipelines.core.runtime")
    device, dtype = case["device"], getattr(torch, case["dtype"])
    config = ben2.BEN2Config.tiny() if case["tiny"] else None
    model = ben2.BEN2Base(config).eval().requires_grad_(False).to(device=device, dtype=dtype)
    component = runtime_mod.Component(model, kind="segmentation", name="BEN2 (random weights)", dtype=dtype)
    runtime = runtime_mod.TorchRuntime(device)
    resolution, batch = case["resolution"], case["batch"]
    images = torch.rand(batch, resolution, resolution, 3, generator=torch.Generator().manual_seed(0))
    ben2.predict_masks(component, images[:1, :128, :128], runtime=runtime, resolution=128)  # warm-up
    before = procs.status_bytes("VmRSS")
    procs.reset_peak_rss()
    times = []
    for _ in range(case["repeats"]):
        sync(device)
        start = time.perf_counter()
        ben2.predict_masks(component, images, runtime=runtime, resolution=resolution, batch_size=batch)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_mib": procs.status_bytes("VmHWM") / 2**20,
            "activation_mib": (procs.status_bytes("VmHWM") - before) / 2**20}


def batches_part(settings: Settings) -> None:
    resolution = 128 if settings.quick else (1024 if settings.size == 512 else settings.size)
    rows = []
    for batch in (1, 4):
        row = procs.child("ben2:case_job", {"resolution": resolution, "batch": batch, "repeats": 1,
                                            "device": str(settings.device), "tiny": settings.quick,
                                            "dtype": "float32" if settings.device.type == "cpu" else "float16"})
        rows.append([f"batch {batch}", row["seconds"], batch / row["seconds"], row["peak_mib"], row["activation_mib"]])
    print_table(f"BEN2 Base{' (tiny)' if settings.quick else ''}, {resolution}², {settings.device.type}",
                ["case", "s per batch", "images/s", "peak RSS MiB", "added while running MiB"], rows)


def run(settings: Settings, parts=PARTS) -> None:
    for part in parts:
        {"batches": batches_part}[part](settings)
