"""Kontext-inpaint speed and memory: sampler step time against Fill, training step time and peak memory per stage.

    python scripts/benchmark_kontext.py            # 512x512 sampler, 256x256 training, a few minutes on a CPU
    python scripts/benchmark_kontext.py --quick    # smaller sizes, fewer steps

(a) Sampler: the Kontext-inpaint sampler (192 input features: 64 noisy + 128 conditioning)
against FLUX.1-Fill's (384: 64 + 320) on the same real-width model (``shallow_fill_transformer``:
every layer at FLUX.1's size, 1 double + 1 single block; the Kontext copy is widened), same
resolution, prompt length and steps. Only the input projection differs, so the two should cost
the same per step.

(b) Training: one optimizer step of the trainer's loss (``flow_matching_loss`` + backward +
clip + AdamW) for stage 1 (x_embedder only) and stage 2 (all parameters), on the tiny test model
and on the shallow real-width model, with and without gradient checkpointing. Each case runs in
its own process so its peak memory is its own: peak RSS on the CPU, ``max_memory_allocated``
on CUDA. FLUX.1-Fill-dev has 19 + 38 blocks; per-block costs scale accordingly.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from packload import offline, pack_module  # noqa: E402

offline()

import torch  # noqa: E402

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------
# Memory


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Highest resident set size seen while active (sampled every millisecond in a thread)."""

    def __init__(self):
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


# --------------------------------------------------------------------------------------
# (a) sampler


def _shallow(dtype, device):
    from make_tiny_models import shallow_fill_transformer

    return shallow_fill_transformer(dtype, device)


def sampler_rows(size: int, steps: int, text_length: int, repeats: int, dtype, device) -> list[dict]:
    """Per-step times of Fill and Kontext-inpaint sampling, alternating runs to share any drift."""
    flow = pack_module("pipelines.flux.flow")
    runtime_mod = pack_module("pipelines.core.runtime")
    ki = pack_module("pipelines.flux.kontext_inpaint")
    loading = pack_module("pipelines.flux.loading")
    conditioning = pack_module("pipelines.flux.conditioning")

    fill = _shallow(dtype, device)
    kontext = ki.widen_fill_transformer(copy.deepcopy(fill))
    components = {
        "FLUX.1-Fill (384 features)": runtime_mod.Component(fill, "diffusion", "shallow fill", dtype),
        "Kontext-inpaint (192 features)": runtime_mod.Component(kontext, "diffusion", "shallow kontext", dtype),
    }
    h = w = size // 8
    tokens = (h // 2) * (w // 2)
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(1, 16, h, w, generator=generator)
    mask_latent = torch.randn(1, 16, h, w, generator=generator)
    fill_cond = torch.randn(1, tokens, 320, generator=generator)
    text = conditioning.FluxText(torch.randn(1, text_length, 4096, generator=generator),
                                 torch.randn(1, 768, generator=generator), None)
    scheduler_config = loading.scheduler_config(None)
    stamps: list[float] = []
    runtime = runtime_mod.TorchRuntime(device, on_progress=lambda value, total, preview: stamps.append(
        _synced_clock(device)))

    def run(name: str, n: int) -> None:
        component = components[name]
        if name.startswith("Kontext"):
            ki.edit(component, source, mask_latent, text, steps=n, guidance=30.0, seed=0, denoise=1.0,
                    scheduler_config=scheduler_config, runtime=runtime)
        else:
            schedule = flow.flux_schedule(n, tokens, scheduler_config)
            inputs = flow.FlowInputs(noise=flow.pack(flow.noise_like((1, 16, h, w), 0)), text=text.states,
                                     pooled=text.pooled, guidance=30.0, latent_h=h, latent_w=w, cond=fill_cond)
            flow.denoise(component, inputs, schedule, runtime)

    times: dict[str, list[float]] = {name: [] for name in components}
    for name in components:  # warm-up: allocator, kernels, rope caches
        run(name, 1)
    for _ in range(repeats):
        for name in components:
            stamps.clear()
            start = _synced_clock(device)
            run(name, steps)
            marks = [start, *stamps]
            times[name] += [b - a for a, b in zip(marks, marks[1:])]
    return [{"sampler": name, "size": f"{size}x{size}", "tokens": f"{tokens} + {text_length} text",
             "steps": steps * repeats, "median_s": statistics.median(values), "min_s": min(values)}
            for name, values in times.items()]


def _synced_clock(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# --------------------------------------------------------------------------------------
# (b) training step (one case per process)


def train_case(case: dict) -> dict:
    train = pack_module("pipelines.flux.kontext_inpaint.train")
    train_config = pack_module("pipelines.flux.kontext_inpaint.config")
    ki = pack_module("pipelines.flux.kontext_inpaint")
    device = torch.device(case["device"])
    dtype = getattr(torch, case["dtype"])
    if case["model"] == "tiny":
        from diffusers import FluxTransformer2DModel

        from make_tiny_models import TINY_TRANSFORMER, _randomize_

        torch.manual_seed(0)
        model = FluxTransformer2DModel(**TINY_TRANSFORMER)
        _randomize_(model, torch.Generator().manual_seed(0))  # as the test models: no zero-initialised layers
        model = model.to(device=device, dtype=dtype)
    else:
        model = _shallow(dtype, device)
    ki.widen_fill_transformer(model)
    params = train.set_trainable(model, case["stage"])
    if case["checkpointing"]:
        model.enable_gradient_checkpointing()
    model.train()
    settings = train_config.TrainSettings(optimizer=case["optimizer"])
    optimizer = train.make_optimizer(settings, params, 1e-5)
    h = w = case["size"] // 8
    generator = torch.Generator().manual_seed(0)
    config = model.config
    batch = {
        "target": torch.randn(1, 16, h, w, generator=generator),
        "source": torch.randn(1, 16, h, w, generator=generator),
        "mask": torch.randn(1, 16, h, w, generator=generator),
        "text": torch.randn(1, case["text_length"], config.joint_attention_dim, generator=generator),
        "pooled": torch.randn(1, config.pooled_projection_dim, generator=generator),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    durations = []
    with PeakRss() as peak:
        for index in range(case["steps"] + 1):  # the first step (optimizer state allocation) is not timed
            start = _synced_clock(device)
            noise, t = train.sample_noise_and_t((1, 16, h, w), 0, index)
            loss = train.flow_matching_loss(model, batch, noise.to(device), t.to(device), 30.0, dtype)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())  # wait for the step to finish
            if index:
                durations.append(_synced_clock(device) - start)
    return {
        "trainable_m": sum(p.numel() for p in params) / 1e6,
        "total_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "seconds_per_step": statistics.median(durations),
        "rss_before_mib": rss_before / MIB,
        "peak_rss_mib": peak.peak / MIB,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / MIB if cuda else None,
    }


def run_case_in_subprocess(case: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--train-case", json.dumps(case)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"training case {case} failed:\n{result.stderr[-3000:]}")
    row = {**case, **json.loads(result.stdout.strip().splitlines()[-1])}
    row["training_mib"] = row["peak_rss_mib"] - row["rss_before_mib"]
    return row


# --------------------------------------------------------------------------------------
# Report


def print_table(title: str, columns: list[tuple[str, str]], rows: list[dict]) -> None:
    """``columns``: (header, format) pairs; format is applied to the row value of the same header key."""
    cells = [[fmt.format(row[key]) if row.get(key) is not None else "-" for key, fmt in columns] for row in rows]
    headers = [key for key, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps (about a minute)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16)")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor", "adamw8bit"))
    parser.add_argument("--train-case", help=argparse.SUPPRESS)  # internal: run one training case, print JSON
    args = parser.parse_args(argv)
    if args.train_case:
        print(json.dumps(train_case(json.loads(args.train_case))))
        return 0

    dtype_name = args.dtype or "bfloat16"
    dtype = getattr(torch, dtype_name)
    quick = args.quick
    print(f"device {args.device}, dtype {dtype_name}, torch {torch.__version__}, threads {torch.get_num_threads()}"
          f"{', quick' if quick else ''}")

    sampler = sampler_rows(size=256 if quick else 512, steps=2 if quick else 3, text_length=128 if quick else 512,
                           repeats=1 if quick else 2, dtype=dtype, device=args.device)
    base = sampler[0]["median_s"]
    for row in sampler:
        row["vs_fill"] = row["median_s"] / base
    print_table("(a) sampler, time per step (shallow real-width FLUX.1: 1 double + 1 single block)",
                [("sampler", "{}"), ("size", "{}"), ("tokens", "{}"), ("steps", "{}"), ("median_s", "{:.3f}"),
                 ("min_s", "{:.3f}"), ("vs_fill", "{:.3f}x")], sampler)

    cases = []
    for model, size, text_length, steps, gc_options in (
        ("tiny", 64, 64, 3 if quick else 10, (False,)),
        ("shallow", 128 if quick else 256, 64 if quick else 128, 1 if quick else 2, (False,) if quick else (False,
                                                                                                           True)),
    ):
        for checkpointing in gc_options:
            for stage in (1, 2):
                cases.append({"model": model, "stage": stage, "checkpointing": checkpointing, "size": size,
                              "text_length": text_length, "steps": steps, "device": args.device,
                              "dtype": "float32" if model == "tiny" else dtype_name, "optimizer": args.optimizer})
    rows = [run_case_in_subprocess(case) for case in cases]
    print_table(f"(b) training step ({args.optimizer}), median time and peak memory; one process per row",
                [("model", "{}"), ("dtype", "{}"), ("size", "{}px"), ("text_length", "{}"), ("stage", "{}"),
                 ("checkpointing", "{}"), ("trainable_m", "{:.2f}M"), ("total_m", "{:.1f}M"),
                 ("seconds_per_step", "{:.3f}"), ("rss_before_mib", "{:.0f}"), ("peak_rss_mib", "{:.0f}"),
                 ("training_mib", "{:.0f}"), ("cuda_peak_mib", "{:.0f}")], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
