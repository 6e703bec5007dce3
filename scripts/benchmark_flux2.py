"""Benchmark EditKit's FLUX.2 [klein] edit sampler against diffusers' Flux2KleinPipeline (not a test; prints a table).

    python scripts/benchmark_flux2.py [--size 512] [--steps 3] [--rounds 3] [--device cpu|cuda] [--dtype fp32|bf16]

Seconds per sampling step of a klein edit with 1 and with 3 reference pictures (each ``size`` x ``size``, output
the same size), on a real-width but shallow klein 4B transformer (24 x 128 heads, text width 7680, 128 input
features, 1 double + 1 single block: every layer has its real size), random weights. Both samplers get the same
transformer object, noise, prompt embeddings (512 random text tokens) and pictures; steps are timed from the first
transformer call to each step callback, so VAE encoding of the references is excluded on both sides. Rounds
alternate which sampler runs first; the table gives each side's median and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from benchmark_fill import StepClock  # noqa: E402

from packload import pack_module  # noqa: E402

SHALLOW_4B = dict(
    patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6, guidance_embeds=False,
)


def time_editkit(model, vae, text, pictures, size, steps, device) -> float:
    runtime_mod = pack_module("pipelines.core.runtime")
    sampler = pack_module("pipelines.flux2.sampler")
    component = model.transformer.get()
    with StepClock(component.module, device) as clock:
        runtime = runtime_mod.TorchRuntime(device, on_progress=clock.step_done)
        sampler.generate(model, vae, text, runtime, width=size, height=size, seed=0, steps=steps,
                         references=pictures)
    return clock.seconds_per_step()


def time_diffusers(model, vae, text, pictures, size, steps, device) -> float:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from PIL import Image

    component = model.transformer.get()
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
                              vae=vae.module, text_encoder=None, tokenizer=None, transformer=component.module,
                              is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    images = [Image.fromarray((p[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for p in pictures]
    with torch.inference_mode(), StepClock(component.module, device) as clock:
        pipe(prompt_embeds=text.to(device, component.dtype), image=images, height=size, width=size,
             num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
             callback_on_step_end=clock.step_done)
    return clock.seconds_per_step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="side of the output and of each reference (mult. of 16)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    import flux2_models
    from diffusers import Flux2Transformer2DModel

    runtime_mod = pack_module("pipelines.core.runtime")
    loading = pack_module("pipelines.flux2.loading")
    torch.manual_seed(0)
    module = Flux2Transformer2DModel(**SHALLOW_4B).to(dtype).eval().requires_grad_(False)
    component = runtime_mod.Component(module, "diffusion", "shallow klein 4B", dtype)
    vae = runtime_mod.Component(flux2_models.tiny_vae().eval(), "vae", "tiny FLUX.2 VAE", torch.float32)
    runtime = runtime_mod.TorchRuntime(device)
    runtime.acquire(component)
    runtime.acquire(vae)
    model = SimpleNamespace(transformer=SimpleNamespace(get=lambda: component),
                            scheduler_config=loading.scheduler_config(None))
    g = torch.Generator().manual_seed(1)
    text = torch.randn(1, 512, SHALLOW_4B["joint_attention_dim"], generator=g)
    rows = []
    for count in (1, 3):
        pictures = [(torch.rand(1, 3, args.size, args.size, generator=g) * 255).round() / 255 for _ in range(count)]
        time_editkit(model, vae, text, pictures, args.size, 2, device)  # warm-up
        ours, theirs = [], []
        for r in range(args.rounds):
            order = (time_editkit, time_diffusers) if r % 2 == 0 else (time_diffusers, time_editkit)
            for fn in order:
                value = fn(model, vae, text, pictures, args.size, args.steps, device)
                (ours if fn is time_editkit else theirs).append(value)
        ratio = statistics.median(a / b for a, b in zip(ours, theirs))
        rows.append((count, statistics.median(ours), statistics.median(theirs), ratio))
    tokens = (args.size // 16) ** 2
    print(f"klein 4B real-width shallow (1 double + 1 single block), {args.size}x{args.size} output and references "
          f"({tokens} tokens each), {args.steps} steps, {args.dtype}, {device}, {args.rounds} alternating rounds")
    print(f"{'references':>10s} {'EditKit s/step':>15s} {'diffusers s/step':>17s} {'ratio':>7s}")
    for count, ours, theirs, ratio in rows:
        print(f"{count:>10d} {ours:>15.4f} {theirs:>17.4f} {ratio:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
