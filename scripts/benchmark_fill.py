"""Benchmark EditKit's FLUX.1-Fill sampler and loaders (not a test; prints a table).

    python scripts/benchmark_fill.py [--size 512] [--steps 4] [--device cpu|cuda] [--skip-shallow]

1. Time per sampling step, EditKit's Fill sampler against diffusers' FluxFillPipeline with identical
   inputs (same transformer object, noise, prompt embeddings, image and mask), on the tiny test
   transformer and on a real-width but shallow FLUX.1-Fill transformer (24x128 heads, T5/CLIP widths
   4096/768, 1 double + 1 single block: every layer has its real size). Steps are timed between
   consecutive step callbacks, so text encoding and VAE work are excluded on both sides.
2. Memory of loading that shallow transformer from a BFL-layout bf16 .safetensors file and from a GGUF
   Q8_0 file through EditKit's loader, each in a fresh process: the size of the loaded weights, the
   process's RSS once every weight page is resident and its peak RSS during loading (both above the
   process's RSS after imports), and torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from packload import pack_module  # noqa: E402


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Timestamps the start of the first transformer call and the end of every step.

    Used identically for both samplers, so the medians compare the denoising loops alone.
    """

    def __init__(self, module, device):
        self.stamps: list[float] = []
        self.device = device
        self.module = module
        self._forward = module.forward

    def __enter__(self):
        def stamped(*args, **kwargs):
            if not self.stamps:
                _sync(self.device)
                self.stamps.append(time.perf_counter())
            return self._forward(*args, **kwargs)

        self.module.forward = stamped
        return self

    def __exit__(self, *exc):
        del self.module.forward  # back to the class's forward

    def step_done(self, *args, **kwargs):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return args[-1] if args and isinstance(args[-1], dict) else None

    def seconds_per_step(self) -> float:
        return statistics.median(b - a for a, b in zip(self.stamps, self.stamps[1:]))


def time_editkit(component, vae, pixels, mask, text, scheduler_config, steps, device) -> float:
    flow = pack_module("pipelines.flux.flow")
    fill = pack_module("pipelines.flux.fill")
    runtime_mod = pack_module("pipelines.core.runtime")
    with StepClock(component.module, device) as clock:
        runtime = runtime_mod.TorchRuntime(device, on_progress=clock.step_done)
        h, w = pixels.shape[-2] // 8, pixels.shape[-1] // 8
        cond = fill.fill_condition_tokens(vae, pixels, mask, runtime)
        noise = flow.pack(flow.noise_like((1, 16, h, w), 0))
        schedule = flow.flux_schedule(steps, noise.shape[1], scheduler_config)
        inputs = flow.FlowInputs(noise=noise, text=text.states, pooled=text.pooled, guidance=30.0, latent_h=h,
                                 latent_w=w, cond=cond)
        flow.denoise(component, inputs, schedule, runtime)
    return clock.seconds_per_step()


def time_diffusers(component, vae, pixels, mask, text, scheduler_config, steps, device) -> float:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    flow = pack_module("pipelines.flux.flow")
    pipe = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config), vae=vae.module, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=component.module,
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = pixels.shape[-2], pixels.shape[-1]
    noise = flow.pack(flow.noise_like((1, 16, h // 8, w // 8), 0))
    dtype = component.dtype
    with torch.inference_mode(), StepClock(component.module, device) as clock:
        pipe(image=pixels.to(device), mask_image=mask.to(device), latents=noise.to(device, dtype),
             prompt_embeds=text.states.to(device, dtype), pooled_prompt_embeds=text.pooled.to(device, dtype),
             height=h, width=w, num_inference_steps=steps, guidance_scale=30.0, output_type="latent",
             callback_on_step_end=clock.step_done)
    return clock.seconds_per_step()


def compare_samplers(label, component, vae, scheduler_config, size, steps, device, results):
    conditioning = pack_module("pipelines.flux.conditioning")
    config = component.module.config
    g = torch.Generator().manual_seed(0)
    text = conditioning.FluxText(torch.randn(1, 512, config.joint_attention_dim, generator=g),
                                 torch.randn(1, config.pooled_projection_dim, generator=g), None)
    pixels = torch.rand(1, 3, size, size, generator=g)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    runtime = pack_module("pipelines.core.runtime").TorchRuntime(device)
    runtime.acquire(component)
    runtime.acquire(vae)
    time_editkit(component, vae, pixels, mask, text, scheduler_config, 2, device)  # warm-up
    ours = time_editkit(component, vae, pixels, mask, text, scheduler_config, steps, device)
    theirs = time_diffusers(component, vae, pixels, mask, text, scheduler_config, steps, device)
    results.append((label, ours, theirs))


def _proc_status_bytes(field: str) -> int:
    """A memory figure of this process from /proc (ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_load(path: str, device: str) -> dict:
    """Child-process mode: load one transformer file and report peak memory."""
    loading = pack_module("pipelines.flux.loading")
    import diffusers  # noqa: F401  (imported before the baseline so it is not counted as loading)

    baseline = _proc_status_bytes("VmRSS")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    component = loading.transformer_source(None, Path(path), torch.bfloat16).get()
    if device == "cuda":
        component.module.to("cuda")
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    state = component.module.state_dict().values()
    weights = sum(t.numel() * t.element_size() for t in state)
    for tensor in state:  # fault in memory-mapped pages: what a first forward would do
        torch.Tensor.as_subclass(tensor, torch.Tensor).reshape(-1).view(torch.uint8).max()
    report = {"load_s": seconds, "weights_bytes": weights,
              "rss_bytes": _proc_status_bytes("VmRSS") - baseline,
              "peak_rss_bytes": _proc_status_bytes("VmHWM") - baseline}
    if device == "cuda":
        report["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return report


def write_shallow_files(folder: Path) -> tuple[Path, Path]:
    from make_tiny_models import _save, shallow_fill_transformer, write_gguf

    layout = pack_module("pipelines.flux.layout")
    bfl = layout.diffusers_transformer_to_bfl(shallow_fill_transformer(torch.bfloat16).state_dict())
    safetensors_path, gguf_path = folder / "shallow-fill-bf16.safetensors", folder / "shallow-fill-Q8_0.gguf"
    _save(bfl, safetensors_path, torch.bfloat16)
    write_gguf(bfl, gguf_path)
    return safetensors_path, gguf_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-shallow", action="store_true", help="tiny model only (fast)")
    parser.add_argument("--skip-speed", action="store_true", help="only the loading-memory comparison")
    parser.add_argument("--measure-load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load, args.device)))
        return 0

    from make_tiny_models import make_tiny_models, shallow_fill_transformer

    loading = pack_module("pipelines.flux.loading")
    runtime_mod = pack_module("pipelines.core.runtime")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        make_tiny_models(scratch / "models")
        folder = scratch / "models" / "diffusers" / "FLUX.1-Fill-dev"
        tiny = loading.transformer_source(folder, None, dtype).get()
        vae = loading.vae_source(folder, None, dtype).get()
        scheduler_config = loading.scheduler_config(folder)
        if not args.skip_speed:
            compare_samplers("tiny", tiny, vae, scheduler_config, args.size, args.steps, device, results)
        memory = {}
        if not args.skip_shallow:
            if not args.skip_speed:
                shallow = runtime_mod.Component(shallow_fill_transformer(dtype, "cpu"), "diffusion", "shallow", dtype)
                compare_samplers("shallow real-width", shallow, vae, scheduler_config, args.size, args.steps,
                                 device, results)
                del shallow
            for name, path in zip(("bf16 safetensors", "GGUF Q8_0"), write_shallow_files(scratch)):
                out = subprocess.run([sys.executable, __file__, "--measure-load", str(path), "--device", args.device],
                                     capture_output=True, text=True, check=True)
                memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
                memory[name]["file_bytes"] = path.stat().st_size

    if results:
        print(f"\nFill sampler, time per step ({args.size}x{args.size}, {args.steps} steps, {args.device}, {dtype}):")
        print(f"{'model':22s} {'EditKit s/step':>15s} {'diffusers s/step':>17s} {'ratio':>7s}")
        for label, ours, theirs in results:
            print(f"{label:22s} {ours:15.4f} {theirs:17.4f} {ours / theirs:7.3f}")
    if memory:
        print("\nShallow real-width FLUX.1-Fill transformer, loaded by EditKit (fresh process each):")
        print(f"{'file':18s} {'file MB':>9s} {'weights MB':>11s} {'RSS MB':>8s} {'peak RSS MB':>12s} "
              f"{'CUDA peak MB':>13s} {'load s':>7s}")
        for name, row in memory.items():
            cuda = f"{row['cuda_peak_bytes'] / 2**20:13.0f}" if "cuda_peak_bytes" in row else f"{'-':>13s}"
            print(f"{name:18s} {row['file_bytes'] / 2**20:9.0f} {row['weights_bytes'] / 2**20:11.0f} "
                  f"{row['rss_bytes'] / 2**20:8.0f} {row['peak_rss_bytes'] / 2**20:12.0f} {cuda} "
                  f"{row['load_s']:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
