"""Measure BEN2 Base speed and peak memory (random weights; a benchmark, not a test).

Each (resolution, batch) case runs in a fresh subprocess so that its peak memory is its own:
peak RSS on the CPU (the process high-water mark, minus the RSS after the model was built),
``torch.cuda.max_memory_allocated`` on CUDA. Timing covers the real inference path
(``predict_masks``: normalisation, the network, mask resize, host copy) on inputs already at
the processing resolution.

    python scripts/benchmark_ben2.py                          # 1024², batch 1 and 4
    python scripts/benchmark_ben2.py --resolution 512 --batch 1 2 --repeats 3
    python scripts/benchmark_ben2.py --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from packload import load_pack  # noqa: E402  (scripts/ is on sys.path when this file runs)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_case(resolution: int, batch: int, repeats: int, device: str, dtype_name: str, tiny: bool) -> dict:
    load_pack()
    from editkit.pipelines.ben2 import BEN2Base, BEN2Config, predict_masks
    from editkit.pipelines.core.runtime import Component, TorchRuntime

    dtype = DTYPES[dtype_name]
    model = BEN2Base(BEN2Config.tiny() if tiny else None).eval().requires_grad_(False).to(device=device, dtype=dtype)
    component = Component(model, kind="segmentation", name="BEN2 (random weights)", dtype=dtype)
    runtime = TorchRuntime(device)
    images = torch.rand(batch, resolution, resolution, 3, generator=torch.Generator().manual_seed(0))

    # Warm-up at a small size: kernel selection and allocator set-up, not a full-size pass.
    predict_masks(component, images[:1, :128, :128], runtime=runtime, resolution=128)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_mib()

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict_masks(component, images, runtime=runtime, resolution=resolution, batch_size=batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)

    best = min(times)
    result = {
        "resolution": resolution,
        "batch": batch,
        "device": device,
        "dtype": dtype_name,
        "seconds_per_batch": best,
        "images_per_second": batch / best,
        "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }
    if device == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_kind"] = "cuda max allocated (weights + activations)"
    else:
        result["peak_mib"] = rss_mib()
        result["activation_mib"] = rss_mib() - base_rss
        result["peak_kind"] = "process peak RSS"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[1024], help="processing sizes (multiples of 128)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (the best is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp16 on CUDA, else fp32")
    parser.add_argument("--tiny", action="store_true", help="the test-size network (checks the script quickly)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    dtype = args.dtype if args.dtype != "auto" else ("fp16" if args.device == "cuda" else "fp32")

    if args.case:
        resolution, batch = map(int, args.case.split("x"))
        print(json.dumps(run_case(resolution, batch, args.repeats, args.device, dtype, args.tiny)))
        return

    print(
        f"BEN2 Base benchmark: {'tiny' if args.tiny else 'full-size'} network, random weights, torch {torch.__version__}"
    )
    if args.device == "cpu":
        print(f"CPU threads: {torch.get_num_threads()}")
    else:
        print(f"GPU: {torch.cuda.get_device_name()}")
    header = (
        f"{'resolution':>10} {'batch':>5} {'dtype':>5} {'s/batch':>9} {'images/s':>9} {'peak MiB':>9} {'act. MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for resolution in args.resolution:
        for batch in args.batch:
            command = [sys.executable, __file__, "--case", f"{resolution}x{batch}", "--repeats", str(args.repeats)]
            command += ["--device", args.device, "--dtype", dtype] + (["--tiny"] if args.tiny else [])
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{resolution:>10} {batch:>5} failed:\n{done.stderr.strip()[-2000:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(r)
            activation = f"{r['activation_mib']:9.0f}" if "activation_mib" in r else f"{'-':>9}"
            print(
                f"{f'{resolution}x{resolution}':>10} {batch:>5} {dtype:>5} {r['seconds_per_batch']:9.2f} "
                f"{r['images_per_second']:9.3f} {r['peak_mib']:9.0f} {activation}",
                flush=True,
            )
    if results:
        print(f"peak MiB: {results[0]['peak_kind']}; weights: {results[0]['weights_mib']:.0f} MiB")
        if args.device == "cpu":
            print("act. MiB: peak RSS growth during the timed runs (activations)")


if __name__ == "__main__":
    main()
