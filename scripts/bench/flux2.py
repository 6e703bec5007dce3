"""FLUX.2 [klein]: EditKit's edit sampler against diffusers' ``Flux2KleinPipeline`` with 1 and 3 reference pictures.

``steps``  klein 4B at real width (24 x 128 heads, text width 7680, 128 input features) and ``--flux2-depth``
           blocks (default 2+8; real 5+20), random weights. Both samplers get the same transformer object,
           noise, prompt states (``--text-tokens`` random tokens) and pictures (each ``size``², output the
           same size); steps are timed between step callbacks with the first span dropped, so the VAE
           encoding of the references is excluded on both sides; the tests' tiny FLUX.2 VAE. Cases
           alternate round by round; the ratio is per round, against diffusers.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import models
from .harness import Settings, StepClock, alternate, pack_module, products, timing_table

PARTS = ("steps",)


def steps_part(settings: Settings) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from PIL import Image

    from tiny import flux2 as tiny_flux2

    runtime_mod = pack_module("pipelines.core.runtime")
    family = pack_module("pipelines.flux2.family").FAMILY
    sampler = pack_module("pipelines.flux2.sampler")
    device, size, steps = settings.device, settings.size, settings.steps + 1
    module = models.flux2_transformer(settings.flux2_depth, settings.dtype, device)
    component = runtime_mod.Component(module, "diffusion", "bench klein 4B", settings.dtype)
    vae = runtime_mod.Component(tiny_flux2.FAMILY.build("vae"), "vae", "tiny FLUX.2 VAE", torch.float32)
    model = SimpleNamespace(transformer=SimpleNamespace(get=lambda: component),
                            scheduler_config=family.scheduler_config(None))
    g = torch.Generator().manual_seed(1)
    text = torch.randn(1, settings.text_tokens, models.FLUX2_KLEIN_4B_WIDTHS["joint_attention_dim"], generator=g)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
                              vae=vae.module, text_encoder=None, tokenizer=None, transformer=module, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)

    for count in (1, 3):
        pictures = [(torch.rand(1, 3, size, size, generator=g) * 255).round() / 255 for _ in range(count)]
        images = [Image.fromarray((p[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for p in pictures]

        def diffusers_run(images=images):
            clock = StepClock(device)
            clock.start()
            with torch.inference_mode():
                pipe(prompt_embeds=text.to(device, settings.dtype), image=images, height=size, width=size,
                     num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
                     callback_on_step_end=clock.tick)
            return clock.per_step()

        def editkit_run(pictures=pictures):
            clock = StepClock(device)
            runtime = runtime_mod.TorchRuntime(device, on_progress=clock.tick)
            clock.start()
            sampler.generate(model, vae, text, runtime, width=size, height=size, seed=0, steps=steps,
                             references=pictures)
            return clock.per_step()

        timings = alternate({"diffusers Flux2KleinPipeline": products(diffusers_run), "EditKit klein edit": editkit_run},
                            settings.rounds, device=device)
        d, s = settings.flux2_depth
        timing_table(f"FLUX.2 [klein] 4B edit, real width, {d}+{s} blocks, {count} reference(s) of {size}², "
                     f"{size}² output, {settings.text_tokens} text tokens, {settings.describe()}", timings)


def run(settings: Settings, parts=PARTS) -> None:
    for part in parts:
        {"steps": steps_part}[part](settings)
