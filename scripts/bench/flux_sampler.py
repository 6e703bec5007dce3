"""FLUX.1-dev sampler: EditKit against diffusers' FluxPipeline (no CFG, and true CFG: EditKit batches the
two passes into one call, diffusers runs them one after the other), and the pack's import time.

Same transformer object, noise and prompt states on both sides; steps timed between step callbacks.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

import torch

from . import models
from .harness import ROOT, Settings, StepClock, alternate, pack_module, print_table, products, timing_table

PARTS = ("steps", "import")


def _editkit(component, settings: Settings, negative=None, cfg=1.0):
    flow = pack_module("pipelines.flux.flow")
    runtime_mod = pack_module("pipelines.core.runtime")
    scheduler_config = pack_module("pipelines.flux.family").FAMILY.scheduler_config(None)
    side = settings.size // 8
    text = models.flux_text(component.module.config, settings.text_tokens)
    noise = flow.pack(flow.noise_like((1, 16, side, side), 0))

    def run():
        clock = StepClock(settings.device)
        runtime = runtime_mod.TorchRuntime(settings.device, on_progress=clock.tick)
        clock.start()
        schedule = flow.flux_schedule(settings.steps + 1, noise.shape[1], scheduler_config)
        inputs = flow.FlowInputs(noise=noise, text=text.states, pooled=text.pooled, guidance=3.5, latent_h=side,
                                 latent_w=side, negative_text=None if negative is None else negative.states,
                                 negative_pooled=None if negative is None else negative.pooled)
        with torch.inference_mode():
            flow.denoise(component, inputs, schedule, runtime, cfg_scale=cfg)
        return clock.per_step()

    return run


def _diffusers(pipe, component, settings: Settings, negative=None, cfg=1.0):
    flow = pack_module("pipelines.flux.flow")
    side, device, dtype = settings.size // 8, settings.device, component.dtype
    text = models.flux_text(component.module.config, settings.text_tokens)
    noise = flow.pack(flow.noise_like((1, 16, side, side), 0))
    extra = {}
    if negative is not None:
        extra = dict(negative_prompt_embeds=negative.states.to(device, dtype),
                     negative_pooled_prompt_embeds=negative.pooled.to(device, dtype), true_cfg_scale=cfg)

    def run():
        clock = StepClock(device)
        clock.start()
        with torch.inference_mode():
            pipe(prompt_embeds=text.states.to(device, dtype), pooled_prompt_embeds=text.pooled.to(device, dtype),
                 latents=noise.to(device, dtype), height=settings.size, width=settings.size,
                 num_inference_steps=settings.steps + 1, guidance_scale=3.5, output_type="latent",
                 callback_on_step_end=clock.tick, **extra)
        return clock.per_step()

    return run


def steps_part(settings: Settings) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    dtype = settings.dtype
    module = models.flux_transformer("dev", settings.flux_depth, dtype, settings.device)
    component = models.component(module, "bench-dev", dtype)
    vae = models.flux_vae(dtype, settings.device, real=False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pack_module("pipelines.flux.family").FAMILY.scheduler_config(None))
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=module)
    pipe.set_progress_bar_config(disable=True)
    d, s = settings.flux_depth
    title = f"FLUX.1-dev sampler, real width, {d}+{s} blocks, {settings.text_tokens} text tokens, {settings.describe()}"
    timing_table(title + ", no CFG", alternate({"diffusers FluxPipeline": products(_diffusers(pipe, component, settings)),
                                                "EditKit": _editkit(component, settings)}, settings.rounds))
    negative = models.flux_text(module.config, settings.text_tokens, seed=1)
    short = models.flux_text(module.config, max(8, settings.text_tokens // 2), seed=1)
    timing_table(title + ", true CFG 3", alternate({
        "diffusers FluxPipeline (2 calls/step)": products(_diffusers(pipe, component, settings, negative, 3.0)),
        "EditKit, batched (1 call/step)": _editkit(component, settings, negative, 3.0),
        "EditKit, negative half as long (unbatched)": _editkit(component, settings, short, 3.0),
    }, settings.rounds))


def import_part(settings: Settings) -> None:
    code = ("import sys, time; sys.path.insert(0, 'scripts'); import torch; t = time.perf_counter(); "
            "from packload import load_pack; load_pack(); print(time.perf_counter() - t)")
    times = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()) for _ in range(max(3, settings.rounds))]
    print_table("Importing the pack after torch (fresh process each)", ["what", "median s", "min–max"],
                [["load_pack()", statistics.median(times), f"{min(times):.3f}–{max(times):.3f}"]])


def run(settings: Settings, parts=PARTS) -> None:
    for part in parts:
        {"steps": steps_part, "import": import_part}[part](settings)
