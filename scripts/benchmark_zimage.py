"""Benchmark Z-Image-Turbo sampling and the progressive recipe (not a test; prints tables).

    python scripts/benchmark_zimage.py [--layers 1] [--steps-per-stage 2] [--device cpu|cuda] [--dtype fp32|bf16]

A real-width shallow Z-Image transformer (width 3840, 30 heads of 128, Qwen3 caption width 2560, ``--layers``
main layers plus one noise and one context refiner; Z-Image-Turbo has 30 + 2 + 2) with random weights, and
random 48-token caption features (text encoding is outside the loop on both sides and not timed):

1. Seconds per step of EditKit's sampler and of diffusers' ZImagePipeline on the same transformer object, noise,
   captions and sigmas, at 336x432 (567 image tokens), same run; ratio = EditKit / diffusers.
2. The seed's three-stage recipe (176x224 -> 336x432 -> 672x864, 9 / 16 / 16 steps, strength 0.7 / 0.6) against
   single-stage text-to-image at 672x864 with 9 steps: transformer token-steps (image tokens x model calls) in
   both strength conventions, and measured wall time per stage. On a CPU the full recipe takes many minutes at
   real width, so each stage runs ``--steps-per-stage`` model calls and its full time is extrapolated from the
   measured seconds per call at that stage's size (say so when quoting). The overhead between stages (latent
   resize, raw/model conversions, noise) is measured directly: the recipe's wall time minus its model calls.
   The final VAE decode is the same once-per-picture cost in both and is not included.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from packload import pack_module  # noqa: E402

CAPTION_TOKENS = 48
SEED_STAGES = [("stage1", 176, 224, 9, None), ("stage2", 336, 432, 16, 0.7), ("stage3", 672, 864, 16, 0.6)]


def shallow_transformer(layers: int, dtype: torch.dtype, device: str):
    """Z-Image-Turbo's layer sizes with ``layers`` main layers and 1 + 1 refiners, random weights."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    with torch.device("meta"):
        model = ZImageTransformer2DModel(dim=3840, n_layers=layers, n_refiner_layers=1, n_heads=30, n_kv_heads=30,
                                         cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in model.state_dict().items():
        if "norm" in name:
            state[name] = torch.ones(tensor.shape, dtype=dtype)
        else:
            state[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(dtype)
    model.load_state_dict(state, assign=True)
    return model.to(device).eval().requires_grad_(False)


class CallClock:
    """Wall time of every transformer call (synchronised on CUDA only around calls, for the benchmark)."""

    def __init__(self, module, device):
        self.module, self.device, self.calls = module, torch.device(device), []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __enter__(self):
        def pre(*_):
            self._sync()
            self._start = time.perf_counter()

        def post(*_):
            self._sync()
            self.calls.append(time.perf_counter() - self._start)

        self._handles = [self.module.register_forward_pre_hook(pre), self.module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def per_step(args, component, vae, scheduler, captions, runtime):
    """Section 1: EditKit vs diffusers, seconds per step at 336x432."""
    from diffusers import ZImagePipeline

    sampler = pack_module("pipelines.zimage.sampler")
    core = pack_module("pipelines.core.sampling")
    steps, h, w = args.compare_steps, 432 // 8, 336 // 8
    noise = core.seeded_noise((1, 16, h, w), 0)
    schedule = sampler.zimage_schedule(scheduler, steps)
    pipe = ZImagePipeline(scheduler=__import__("diffusers").FlowMatchEulerDiscreteScheduler.from_config(scheduler),
                          vae=vae.module, text_encoder=None, tokenizer=None, transformer=component.module)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for _ in range(2):  # second round is the one reported (first warms up allocators)
        with CallClock(component.module, args.device) as clock:
            start = time.perf_counter()
            ours = sampler.sample(component, captions, noise, schedule, runtime)
            results["editkit"] = (time.perf_counter() - start) / steps, sum(clock.calls) / steps
        with CallClock(component.module, args.device) as clock, torch.inference_mode():
            start = time.perf_counter()
            theirs = pipe(prompt_embeds=captions, height=432, width=336, num_inference_steps=steps, guidance_scale=0.0,
                          generator=torch.Generator().manual_seed(0), output_type="latent").images
            results["diffusers"] = (time.perf_counter() - start) / steps, sum(clock.calls) / steps
    diff = (ours.float().cpu() - theirs.float().cpu()).abs().max().item()
    print(f"\n1. Seconds per step at 336x432 ({(h // 2) * (w // 2)} image tokens), {steps} steps, same run")
    print(f"   {'':<10} {'s/step (loop)':>14} {'of it: model':>13}")
    for name, (loop, model) in results.items():
        print(f"   {name:<10} {loop:>14.3f} {model:>13.3f}")
    print(f"   ratio EditKit/diffusers: {results['editkit'][0] / results['diffusers'][0]:.3f}   "
          f"(max |latent difference| {diff:.2e})")


def recipe_table(args, component, vae, scheduler, captions, runtime):
    """Section 2: three-stage recipe against single-stage 9 steps at 672x864."""
    recipe_mod = pack_module("pipelines.zimage.recipe")
    progressive = pack_module("pipelines.zimage.progressive")

    def recipe(stages, convention):
        spec = {"sampler": "euler", "strength_convention": convention, "progressive_stages": {
            name: {"width": w, "height": h, "num_inference_steps": s, **({"strength": st} if st else {})}
            for name, w, h, s, st in stages}}
        return recipe_mod.parse_recipe(spec)

    single = [("single", 672, 864, 9, None)]
    print("\n2. Transformer token-steps (image tokens x model calls), full recipes, CFG off (cfg 1 in every stage)")
    for convention in ("denoise", "strength"):
        for label, stages in (("three-stage", SEED_STAGES), ("single-stage", single)):
            r = recipe(stages, convention)
            per = [s.tokens * r.model_calls(s) for s in r.stages]
            calls = [r.model_calls(s) for s in r.stages]
            print(f"   {convention:<8} {label:<13} calls {calls!s:<14} token-steps {per!s:<26} total {sum(per):>7}")

    quick = [(n, w, h, args.steps_per_stage, st) for n, w, h, _s, st in SEED_STAGES]
    measured = recipe(quick, "denoise")
    with CallClock(component.module, args.device) as clock:
        start = time.perf_counter()
        result = progressive.run_progressive(component, vae, scheduler, captions, None, measured, 0, runtime)
        wall = time.perf_counter() - start - result.decode_seconds
    per_call, offset = [], 0
    for report in result.reports:
        calls = clock.calls[offset: offset + report.model_calls]
        offset += report.model_calls
        per_call.append(sum(calls) / len(calls))
    overhead = wall - sum(clock.calls)
    with CallClock(component.module, args.device) as clock:
        progressive.run_progressive(component, vae, scheduler, captions, None,
                                    recipe([("single", 672, 864, args.steps_per_stage, None)], "denoise"), 0, runtime)
    single_call = sum(clock.calls) / len(clock.calls)
    print(f"\n   Wall time per stage ({args.steps_per_stage} model calls measured per stage, full steps extrapolated "
          "from the measured s/call)")
    print(f"   {'stage':<8} {'size':>9} {'tokens':>7} {'s/call':>8} {'denoise conv.':>14} {'strength conv.':>15}")
    full = {c: recipe(SEED_STAGES, c) for c in ("denoise", "strength")}
    totals = {"denoise": 0.0, "strength": 0.0}
    for report, seconds, stage in zip(result.reports, per_call, full["denoise"].stages, strict=True):
        row = []
        for convention in ("denoise", "strength"):
            t = seconds * full[convention].model_calls(next(s for s in full[convention].stages if s.name == stage.name))
            totals[convention] += t
            row.append(t)
        print(f"   {report.name:<8} {report.width:>4}x{report.height:<4} {stage.tokens:>7} {seconds:>8.3f} "
              f"{row[0]:>13.1f}s {row[1]:>14.1f}s")
    print(f"   {'total':<8} {'':>9} {'':>7} {'':>8} {totals['denoise']:>13.1f}s {totals['strength']:>14.1f}s")
    print(f"   single-stage 672x864, 9 steps: {single_call:.3f} s/call -> {9 * single_call:.1f}s")
    print(f"   overhead between stages (measured: recipe wall minus model calls, {len(result.reports)} stages): "
          f"{overhead * 1000:.1f} ms in total")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1, help="main transformer layers (Turbo has 30)")
    parser.add_argument("--steps-per-stage", type=int, default=2)
    parser.add_argument("--compare-steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-recipe", action="store_true")
    args = parser.parse_args(argv)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    runtime_mod = pack_module("pipelines.core.runtime")
    loading = pack_module("pipelines.zimage.loading")
    runtime = runtime_mod.TorchRuntime(args.device)
    start = time.perf_counter()
    module = shallow_transformer(args.layers, dtype, args.device)
    component = runtime_mod.Component(module, "diffusion", "shallow Z-Image", dtype)
    params = sum(p.numel() for p in module.parameters()) / 1e6
    print(f"Real-width shallow Z-Image transformer: {args.layers} layer(s) + 1 + 1 refiners, {params:.0f} M "
          f"parameters, {args.dtype} on {args.device} (built in {time.perf_counter() - start:.1f}s); "
          f"{torch.get_num_threads()} CPU threads")
    from diffusers import AutoencoderKL

    tiny_vae = AutoencoderKL(block_out_channels=[32, 32, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
                             up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, layers_per_block=1,
                             norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                             use_quant_conv=False, use_post_quant_conv=False).eval()
    vae = runtime_mod.Component(tiny_vae.to(args.device), "vae", "tiny FLUX.1 VAE", torch.float32)
    scheduler = loading.scheduler_config(None)
    g = torch.Generator().manual_seed(1)
    captions = [torch.randn(CAPTION_TOKENS, 2560, generator=g).to(dtype)]
    with torch.inference_mode():
        if not args.skip_compare:
            per_step(args, component, vae, scheduler, captions, runtime)
        if not args.skip_recipe:
            recipe_table(args, component, vae, scheduler, captions, runtime)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
