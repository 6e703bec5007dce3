"""What every EditKit benchmark shares: settings, timing, ratios and one table format.

Timing rule (the machine these run on is shared and noisy): the cases of one comparison run
alternately, round after round, in one process; each round gives every case one sample and one
ratio to the reference case *of that round*, so a burst of load hits both sides of a ratio. Tables
show the median and the spread (min–max) of the samples and of the per-round ratios, and the time
of each case's first call (warm-up: caches, and the compile time where a case compiles).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
for _folder in ("tests", "scripts"):
    if str(ROOT / _folder) not in sys.path:
        sys.path.insert(0, str(ROOT / _folder))

from packload import offline, pack_module  # noqa: E402

offline()

__all__ = ["ROOT", "Settings", "Timing", "StepClock", "alternate", "pack_module", "print_table", "timing_table",
           "sync", "add_arguments", "settings_from", "time_shares"]


# --------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    """One benchmark run's knobs; every family file reads the ones it needs.

    The defaults are what README "Benchmarks" quotes: real width at a depth where a step's matmuls dominate (4+8
    FLUX.1 blocks: over 97 % of a call's operator time, ``fill:share``), 256² with 128 text tokens (a 4+8 step
    is about 30 s on 2 CPU cores, 4x that at 512²), 3 timed steps after the dropped first, 3 alternating rounds.
    """

    device: torch.device
    dtype: torch.dtype
    size: int = 256
    steps: int = 3
    rounds: int = 3
    flux_depth: tuple[int, int] = (4, 8)  # double, single blocks (FLUX.1: 19 + 38)
    qwen_depth: int = 8  # Qwen-Image: 60
    zimage_depth: int = 8  # Z-Image: 30
    flux2_depth: tuple[int, int] = (2, 8)  # FLUX.2 [klein] 4B: 5 + 20
    text_tokens: int = 128
    quick: bool = False
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.device.type}, {str(self.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
                f"{self.size}², {self.steps} steps, {self.rounds} rounds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="compute dtype (auto: fp32 on a CPU, bf16 on a GPU)")
    parser.add_argument("--size", type=int, default=256, help="picture side in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison")
    parser.add_argument("--flux-depth", default="4,8", help="FLUX.1 double,single blocks (real: 19,38)")
    parser.add_argument("--qwen-depth", type=int, default=8, help="Qwen-Image blocks (real: 60)")
    parser.add_argument("--zimage-depth", type=int, default=8, help="Z-Image main blocks (real: 30)")
    parser.add_argument("--flux2-depth", default="2,8", help="FLUX.2 [klein] 4B double,single blocks (real: 5,20)")
    parser.add_argument("--text-tokens", type=int, default=128, help="prompt tokens the transformers see")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1+1 Flux and klein / 1 Qwen / 1 Z-Image blocks, 128², 2 steps, 2 rounds")


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device)
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = names.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    double, single = (int(v) for v in str(args.flux_depth).split(","))
    settings = Settings(device, dtype, args.size, args.steps, args.rounds, (double, single), args.qwen_depth,
                        args.zimage_depth, tuple(int(v) for v in str(args.flux2_depth).split(",")), args.text_tokens,
                        args.quick)
    if args.quick:
        settings.size, settings.steps, settings.rounds = 128, 2, 2
        settings.flux_depth, settings.qwen_depth, settings.zimage_depth = (1, 1), 1, 1
        settings.flux2_depth = (1, 1)
        settings.text_tokens = min(settings.text_tokens, 64)
    return settings


# --------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Samples of one case (seconds per unit: per step, per call, per image...)."""

    name: str
    samples: list[float] = field(default_factory=list)
    first: float | None = None  # first call, not among the samples (warm-up, compilation)
    ratios: list[float] = field(default_factory=list)  # per round, against the reference of that round
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.samples), max(self.samples)


class StepClock:
    """Seconds per sampling step from the samplers' own step callbacks (EditKit's ``on_progress``,
    diffusers' ``callback_on_step_end``): the first step is dropped (it also holds the preparation), so
    text encoding and VAE work are excluded on both sides."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device
        self.marks: list[float] = []

    def start(self) -> None:
        sync(self.device)
        self.marks = [time.perf_counter()]

    def tick(self, *args, **_kwargs):
        sync(self.device)
        self.marks.append(time.perf_counter())
        return args[-1] if args and isinstance(args[-1], dict) else {}

    def per_step(self) -> float:
        spans = [b - a for a, b in zip(self.marks, self.marks[1:])][1:]
        if not spans:
            raise RuntimeError("StepClock: fewer than 2 steps were ticked; run at least 2 steps")
        return statistics.median(spans)


def _timed(case: Callable[[], float | None], device) -> float:
    sync(device)
    started = time.perf_counter()
    reported = case()
    sync(device)
    return float(reported) if reported is not None else time.perf_counter() - started


def products(case: Callable[[], float | None], backend: str = "torch") -> Callable[[], float | None]:
    """``case`` run with ``backend``'s fp32 CPU products (``pipelines/core/matmul.py``).

    Peers run with ``torch``: the transformer object is shared, and EditKit's Component made its Linear layers
    core.matmul's, so without this a diffusers pipeline would get EditKit's oneDNN products too. ``torch`` is
    exactly what a plain ``torch.nn.Linear`` computes, i.e. the peer as it runs by itself."""
    matmul = pack_module("pipelines.core.matmul")

    def run():
        with matmul.using(backend):
            return case()

    return run


def alternate(cases: dict[str, Callable[[], float | None]], rounds: int, reference: str | None = None,
              warmup: int = 1, device=None) -> dict[str, Timing]:
    """Run ``cases`` alternately for ``rounds`` rounds (after ``warmup`` untimed rounds, the first of which
    is reported as each case's first-call time). A case returns its own seconds per unit (e.g. a
    :class:`StepClock` median) or None to be timed whole. The first case is the reference by default."""
    reference = reference or next(iter(cases))
    timings = {name: Timing(name) for name in cases}
    for w in range(warmup):
        for name, case in cases.items():
            seconds = _timed(case, device)
            if w == 0:
                timings[name].first = seconds
    for r in range(rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))  # no case always runs right after another
        for name in order:
            timings[name].samples.append(_timed(cases[name], device))
        base = timings[reference].samples[-1]
        for timing in timings.values():
            timing.ratios.append(timing.samples[-1] / base)
    return timings


# --------------------------------------------------------------------------------------
# Where a call's time goes

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "mkldnn::_linear_pointwise")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
             "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention",
             "aten::_flash_attention_forward", "aten::_efficient_attention_forward")


def time_shares(call: Callable[[], object]) -> dict[str, float]:
    """Shares of one call's operator time (torch profiler, self time of each ATen and oneDNN operator): matmuls,
    attention kernels, everything else (norms, activations, rotary, casts, copies). A benchmark depth is deep
    enough when the matmuls dominate, as they do in the real models."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        call()
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::"))]
    device = torch.cuda.is_available()

    def own(event):
        return event.self_device_time_total if device else event.self_cpu_time_total

    total = sum(own(e) for e in events) or 1.0
    matmul = sum(own(e) for e in events if e.key in MATMULS) / total
    attention = sum(own(e) for e in events if e.key in ATTENTION) / total
    return {"matmuls": matmul, "attention": attention, "other": 1.0 - matmul - attention}


# --------------------------------------------------------------------------------------
# Tables


def print_table(title: str, header: list[str], rows: list[list], out=None) -> None:
    """One format for every table: a Markdown table under a title line (paste it into the README)."""
    out = out or sys.stdout

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
        return "-" if value is None else str(value)

    print(f"\n{title}\n", file=out)
    print("| " + " | ".join(header) + " |", file=out)
    print("|" + "---|" * len(header), file=out)
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |", file=out)
    out.flush()


def timing_table(title: str, timings: dict[str, Timing], unit: str = "s/step", extra: dict | None = None) -> None:
    """The standard timing table: median, spread, per-round ratio to the reference, first call."""
    extra = extra or {}
    header = ["case", unit, "min–max", "ratio (median of rounds)", "ratio min–max", "first call s"]
    header += list(next(iter(extra.values())).keys()) if extra else []
    rows = []
    for timing in timings.values():
        lo, hi = timing.spread
        rlo, rhi = min(timing.ratios), max(timing.ratios)
        rows.append([timing.name + (f" ({timing.note})" if timing.note else ""), timing.median, f"{lo:.4g}–{hi:.4g}",
                     statistics.median(timing.ratios), f"{rlo:.3f}–{rhi:.3f}", timing.first,
                     *extra.get(timing.name, {}).values()])
    print_table(title, header, rows)
