"""Z-Image-Turbo: EditKit's sampler against diffusers' ZImagePipeline (ComfyUI 0.3.64 has no native
Z-Image, so diffusers is the peer), and the progressive three-stage recipe against one stage.

``steps``  Same transformer, noise and caption states; seconds per step between step callbacks, at
           ``size``² (EditKit also with compiled blocks).
``recipe`` Token-steps (image tokens x model calls) of the seed's three-stage recipe and of single-stage
           9 steps (counted), and both run end to end with ``--steps`` calls per stage (timed).
"""

from __future__ import annotations

import torch

from . import models
from .harness import Settings, StepClock, alternate, pack_module, print_table, products, timing_table

PARTS = ("steps", "recipe")
CAPTION_TOKENS = 48
SEED_STAGES = [("stage1", 176, 224, 9, None), ("stage2", 336, 432, 16, 0.7), ("stage3", 672, 864, 16, 0.6)]


def _setup(settings: Settings, name: str = "bench-zimage"):
    module = models.zimage_transformer(settings.zimage_depth, settings.dtype, settings.device)
    component = models.component(module, name, settings.dtype)
    vae = models.component(models.flux_vae(torch.float32, settings.device, real=False), "tiny-vae", torch.float32,
                           "vae")
    g = torch.Generator().manual_seed(1)
    captions = [torch.randn(CAPTION_TOKENS, 2560, generator=g).to(settings.dtype)]
    return component, vae, captions


def steps_part(settings: Settings) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    sampler = pack_module("pipelines.zimage.sampler")
    sampling = pack_module("pipelines.core.sampling")
    runtime_mod = pack_module("pipelines.core.runtime")
    compile_mod = pack_module("pipelines.core.compile")
    scheduler = pack_module("pipelines.zimage.family").FAMILY.scheduler_config(None)
    component, vae, captions = _setup(settings)
    size, device, steps = settings.size, settings.device, settings.steps + 1
    noise = sampling.seeded_noise((1, 16, size // 8, size // 8), 0)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler), vae=vae.module,
                          text_encoder=None, tokenizer=None, transformer=component.module)
    pipe.set_progress_bar_config(disable=True)

    def editkit(which):
        def run():
            clock = StepClock(device)
            runtime = runtime_mod.TorchRuntime(device, on_progress=clock.tick)
            clock.start()
            with torch.inference_mode():
                sampler.sample(which, captions, noise, sampler.zimage_schedule(scheduler, steps), runtime)
            return clock.per_step()

        return run

    def diffusers():
        clock = StepClock(device)
        clock.start()
        with torch.inference_mode():
            pipe(prompt_embeds=captions, height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                 latents=noise.to(device, settings.dtype), output_type="latent", callback_on_step_end=clock.tick)
        return clock.per_step()

    cases = {"diffusers ZImagePipeline": products(diffusers), "EditKit": editkit(component),
             "EditKit, torch's default products": products(editkit(component))}
    if settings.extra.get("compile", True):
        compiled, _, _ = _setup(settings, "bench-zimage-compiled")
        compile_mod.apply(compiled, "on", device)
        cases["EditKit, compile=on"] = editkit(compiled)
    timing_table(f"Z-Image-Turbo, real width, {settings.zimage_depth} blocks + 1 + 1 refiners, {CAPTION_TOKENS} caption "
                 f"tokens, {settings.describe()}", alternate(cases, settings.rounds, device=device))


def recipe_part(settings: Settings) -> None:
    recipe_mod = pack_module("pipelines.zimage.recipe")
    progressive = pack_module("pipelines.zimage.progressive")
    runtime_mod = pack_module("pipelines.core.runtime")

    def recipe(stages, convention):
        spec = {"sampler": "euler", "strength_convention": convention, "progressive_stages": {
            name: {"width": w, "height": h, "num_inference_steps": s, **({"strength": st} if st else {})}
            for name, w, h, s, st in stages}}
        return recipe_mod.parse_recipe(spec)

    single = [("single", 672, 864, 9, None)]
    rows = []
    for convention in ("denoise", "strength"):
        for label, stages in (("three-stage", SEED_STAGES), ("single-stage", single)):
            r = recipe(stages, convention)
            per = [s.tokens * r.model_calls(s) for s in r.stages]
            rows.append([convention, label, str([r.model_calls(s) for s in r.stages]), str(per), sum(per)])
    print_table("Z-Image recipes: transformer token-steps (image tokens x model calls), CFG off",
                ["convention", "recipe", "calls per stage", "token-steps per stage", "total"], rows)
    component, vae, captions = _setup(settings)
    scheduler = pack_module("pipelines.zimage.family").FAMILY.scheduler_config(None)
    runtime = runtime_mod.TorchRuntime(settings.device)
    quick = recipe([(n, w, h, settings.steps, st) for n, w, h, _s, st in SEED_STAGES], "denoise")
    one = recipe([("single", 672, 864, settings.steps, None)], "denoise")

    def run(r):
        def go():
            with torch.inference_mode():
                progressive.run_progressive(component, vae, scheduler, captions, None, r, 0, runtime)

        return go

    timing_table(f"Z-Image recipes end to end, {settings.steps} calls per stage (tiny VAE), {settings.zimage_depth} "
                 f"blocks, {settings.describe()}",
                 alternate({"single stage 672x864": run(one), "three stages (seed sizes)": run(quick)},
                           max(1, settings.rounds // 2)), unit="s/run")


def run(settings: Settings, parts=PARTS) -> None:
    for part in parts:
        {"steps": steps_part, "recipe": recipe_part}[part](settings)
