"""Benchmark EditKit · Flux Sampler (FLUX.1-dev) against diffusers' FluxPipeline (not a test; prints a table).

    python scripts/benchmark_flux_sampler.py [--size 512] [--steps 4] [--device cpu|cuda] [--skip-shallow]
                                             [--comfyui /path/to/ComfyUI --comfyui-python /path/to/python]

1. Seconds per sampling step of EditKit's FLUX.1-dev sampler and of diffusers' FluxPipeline with the same
   transformer object, noise and prompt embeddings, on the tiny test transformer and on a real-width shallow
   FLUX.1-dev transformer (24x128 heads, T5/CLIP widths 4096/768, 1 double + 1 single block). Steps are timed
   between consecutive step callbacks (text encoding and VAE excluded on both sides); ratio = EditKit/diffusers.
2. True CFG (a negative prompt, scale 3): EditKit's batched cond+uncond call, EditKit unbatched (negative of a
   different length), and diffusers (two calls per step), each against the same model without CFG.
3. Pack import time: the seconds importing EditKit adds to a process that already imported torch (what
   ComfyUI's start pays), median of 5 fresh processes; with --comfyui also ComfyUI's own "Import times for
   custom nodes" line from a real start (--quick-test-for-ci).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_fill import StepClock  # noqa: E402

from packload import pack_module  # noqa: E402


def _text(config, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    return pack_module("pipelines.flux.conditioning").FluxText(
        torch.randn(1, tokens, config.joint_attention_dim, generator=g),
        torch.randn(1, config.pooled_projection_dim, generator=g), None)


def time_editkit(component, vae, scheduler_config, size, steps, device, negative=None, cfg=1.0) -> float:
    gen = pack_module("pipelines.flux.generate")
    runtime_mod = pack_module("pipelines.core.runtime")
    text = _text(component.module.config, 512, 0)
    with StepClock(component.module, device) as clock:
        runtime = runtime_mod.TorchRuntime(device, on_progress=clock.step_done)
        flow = pack_module("pipelines.flux.flow")
        noise = flow.pack(flow.noise_like((1, 16, size // 8, size // 8), 0))
        schedule = flow.flux_schedule(steps, noise.shape[1], scheduler_config)
        inputs = flow.FlowInputs(noise=noise, text=text.states, pooled=text.pooled, guidance=3.5,
                                 latent_h=size // 8, latent_w=size // 8,
                                 negative_text=None if negative is None else negative.states,
                                 negative_pooled=None if negative is None else negative.pooled)
        flow.denoise(component, inputs, schedule, runtime, cfg_scale=cfg)
    del gen
    return clock.seconds_per_step()


def time_diffusers(component, vae, scheduler_config, size, steps, device, negative=None, cfg=1.0) -> float:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    flow = pack_module("pipelines.flux.flow")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config), vae=vae.module,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=component.module)
    pipe.set_progress_bar_config(disable=True)
    dtype = component.dtype
    text = _text(component.module.config, 512, 0)
    noise = flow.pack(flow.noise_like((1, 16, size // 8, size // 8), 0))
    extra = {}
    if negative is not None:
        extra = dict(negative_prompt_embeds=negative.states.to(device, dtype),
                     negative_pooled_prompt_embeds=negative.pooled.to(device, dtype), true_cfg_scale=cfg)
    with torch.inference_mode(), StepClock(component.module, device) as clock:
        pipe(prompt_embeds=text.states.to(device, dtype), pooled_prompt_embeds=text.pooled.to(device, dtype),
             latents=noise.to(device, dtype), height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
             output_type="latent", callback_on_step_end=clock.step_done, **extra)
    return clock.seconds_per_step()


def shallow_dev_transformer(dtype, device):
    from diffusers import FluxTransformer2DModel

    from make_tiny_models import SHALLOW_TRANSFORMER

    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**{**SHALLOW_TRANSFORMER, "in_channels": 64, "out_channels": None})
    return model.to(dtype).eval().requires_grad_(False)


def bench_model(label, component, vae, scheduler_config, size, steps, device, rows):
    runtime = pack_module("pipelines.core.runtime").TorchRuntime(device)
    runtime.acquire(component)
    runtime.acquire(vae)
    time_editkit(component, vae, scheduler_config, size, 2, device)  # warm-up
    cfg = _text(component.module.config, 512, 1)
    short = _text(component.module.config, 256, 1)
    plain = (time_editkit(component, vae, scheduler_config, size, steps, device),
             time_diffusers(component, vae, scheduler_config, size, steps, device))
    rows.append((label, "no CFG", *plain))
    with_cfg = (time_editkit(component, vae, scheduler_config, size, steps, device, cfg, 3.0),
                time_diffusers(component, vae, scheduler_config, size, steps, device, cfg, 3.0))
    rows.append((label, "true CFG 3 (EditKit batched)", *with_cfg))
    unbatched = time_editkit(component, vae, scheduler_config, size, steps, device, short, 3.0)
    rows.append((label, "true CFG 3 (EditKit unbatched)", unbatched, with_cfg[1]))
    rows.append((label, "CFG cost vs none (EditKit / diffusers)", with_cfg[0] / plain[0], with_cfg[1] / plain[1]))


def import_seconds(runs: int = 5) -> float:
    code = ("import sys, time; sys.path.insert(0, 'scripts'); import torch; t = time.perf_counter(); "
            "from packload import load_pack; load_pack(); print(time.perf_counter() - t)")
    times = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()) for _ in range(runs)]
    return statistics.median(times)


def comfyui_import_line(comfy_root: str, python: str) -> str:
    """ComfyUI's own measurement of the pack's import, from a real start with the pack as a custom node."""
    with tempfile.TemporaryDirectory() as tmp:
        nodes_dir = Path(tmp) / "custom_nodes"
        nodes_dir.mkdir()
        (nodes_dir / "EditKit").symlink_to(ROOT)
        config = Path(tmp) / "extra.yaml"
        config.write_text(f"editkit_bench:\n  custom_nodes: {nodes_dir}\n")
        out = subprocess.run([python, "main.py", "--cpu", "--quick-test-for-ci", "--extra-model-paths-config",
                              str(config), "--disable-all-custom-nodes", "--whitelist-custom-nodes", "EditKit"],
                             cwd=comfy_root, capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
        found = re.findall(r"^\s*([\d.]+) seconds.*EditKit.*$", text, flags=re.M)
        return f"{found[0]} s (ComfyUI's 'Import times for custom nodes')" if found else "not found in ComfyUI's log"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-shallow", action="store_true")
    parser.add_argument("--comfyui", help="ComfyUI root, to read its own import-time measurement")
    parser.add_argument("--comfyui-python", default=sys.executable)
    args = parser.parse_args()
    device = torch.device(args.device)
    loading = pack_module("pipelines.flux.loading")
    from make_tiny_models import make_tiny_models

    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_models(tmp)
        f32 = torch.float32
        tiny = loading.transformer_source(None, paths["dev_bfl"], f32).get()
        vae = loading.vae_source(paths["fill_folder"], None, f32).get()
        scheduler = loading.scheduler_config(paths["fill_folder"])
        bench_model("tiny", tiny, vae, scheduler, args.size, args.steps, device, rows)
        if not args.skip_shallow:
            dtype = torch.bfloat16 if device.type == "cuda" else f32
            component = pack_module("pipelines.core.runtime").Component(
                shallow_dev_transformer(dtype, device), "diffusion", "shallow FLUX.1-dev", dtype)
            bench_model("real-width shallow", component, vae, scheduler, args.size, args.steps, device, rows)
    print(f"\nFLUX.1-dev sampler, {args.size}x{args.size}, {args.steps} steps, {device}")
    print(f"{'model':<20} {'case':<40} {'EditKit':>10} {'diffusers':>10} {'ratio':>7}")
    for label, case, ours, theirs in rows:
        unit = "" if "cost" in case else " s"
        print(f"{label:<20} {case:<40} {ours:>8.4f}{unit:2} {theirs:>8.4f}{unit:2} {ours / theirs:>7.3f}")
    print(f"\npack import after torch: {import_seconds():.3f} s (median of 5 fresh processes)")
    if args.comfyui:
        print("ComfyUI start, EditKit import:", comfyui_import_line(args.comfyui, args.comfyui_python))


if __name__ == "__main__":
    main()
