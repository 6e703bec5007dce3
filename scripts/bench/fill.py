"""FLUX.1-Fill: EditKit's sampler against diffusers' FluxFillPipeline and native ComfyUI; loading memory.

``steps``   Seconds per step of EditKit's Fill sampler and diffusers' ``FluxFillPipeline`` on the same
            transformer object, noise, prompt states, picture and mask (steps timed between the samplers'
            step callbacks; text encoding and VAE excluded), plus EditKit with compiled blocks
            (``compile=on``; its first call holds the compilation).
``comfyui`` ComfyUI's executor (``--cpu --use-pytorch-cross-attention``, the best native configuration):
            native UNETLoader + InpaintModelConditioning + KSampler against EditKit Flux Loader + Fill
            Inpaint (``compile`` off and on) on the same files, seconds per step from progress updates.
``share``   Where one transformer call's time goes (torch profiler: matmuls, attention, the rest) at the chosen
            depth and at 1+1 blocks: why the figures are taken at a depth where the matmuls dominate.
``load``    Loading the transformer from a BFL bf16 ``.safetensors`` and from GGUF Q8_0 in a fresh process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from . import models, procs
from .harness import Settings, StepClock, alternate, pack_module, print_table, products, time_shares, timing_table

PARTS = ("steps", "comfyui", "share", "load")


def _sampler_case(component, vae, settings: Settings, diffusers_pipe=None):
    flow = pack_module("pipelines.flux.flow")
    fill = pack_module("pipelines.flux.fill")
    runtime_mod = pack_module("pipelines.core.runtime")
    family = pack_module("pipelines.flux.family").FAMILY
    size, device = settings.size, settings.device
    text = models.flux_text(component.module.config, settings.text_tokens)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, size, size, generator=g)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    scheduler_config = family.scheduler_config(None)
    h = w = size // 8
    noise = flow.pack(flow.noise_like((1, 16, h, w), 0))
    steps = settings.steps + 1  # the first step holds the preparation and is dropped

    def editkit():
        clock = StepClock(device)
        runtime = runtime_mod.TorchRuntime(device, on_progress=clock.tick)
        clock.start()
        cond = fill.fill_condition_tokens(vae, pixels, mask, runtime)
        schedule = flow.flux_schedule(steps, noise.shape[1], scheduler_config)
        inputs = flow.FlowInputs(noise=noise, text=text.states, pooled=text.pooled, guidance=30.0, latent_h=h,
                                 latent_w=w, cond=cond)
        with torch.inference_mode():
            flow.denoise(component, inputs, schedule, runtime)
        return clock.per_step()

    def diffusers():
        clock = StepClock(device)
        dtype = component.dtype
        clock.start()
        with torch.inference_mode():
            diffusers_pipe(image=pixels.to(device), mask_image=mask.to(device), latents=noise.to(device, dtype),
                           prompt_embeds=text.states.to(device, dtype),
                           pooled_prompt_embeds=text.pooled.to(device, dtype), height=size, width=size,
                           num_inference_steps=steps, guidance_scale=30.0, output_type="latent",
                           callback_on_step_end=clock.tick)
        return clock.per_step()

    return diffusers if diffusers_pipe is not None else editkit


def steps_part(settings: Settings) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    family = pack_module("pipelines.flux.family").FAMILY
    compile_mod = pack_module("pipelines.core.compile")
    dtype = settings.dtype
    module = models.flux_transformer("fill", settings.flux_depth, dtype, settings.device)
    component = models.component(module, "bench-fill", dtype)
    vae = models.component(models.flux_vae(dtype, settings.device, real=False), "tiny-vae", dtype, "vae")
    pipe = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(family.scheduler_config(None)),
                            vae=vae.module, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            transformer=module)
    pipe.set_progress_bar_config(disable=True)
    cases = {"diffusers FluxFillPipeline": products(_sampler_case(component, vae, settings, pipe)),
             "EditKit Fill": _sampler_case(component, vae, settings),
             "EditKit Fill, torch's default products": products(_sampler_case(component, vae, settings))}
    compiled = None
    if settings.extra.get("compile", True):
        compiled = models.component(models.twin(module), "bench-fill-compiled", dtype)  # same weights
        compile_mod.apply(compiled, "on", settings.device)
        cases["EditKit Fill, compile=on"] = _sampler_case(compiled, vae, settings)
    timings = alternate(cases, settings.rounds, device=settings.device)
    d, s = settings.flux_depth
    title = (f"FLUX.1-Fill, real width, {d}+{s} blocks, {settings.size}², {settings.text_tokens} text tokens, "
             f"{settings.describe()}")
    if compiled is not None:  # the compiled blocks against the eager ones, one transformer call on the same inputs
        from .gguf import _inputs

        inputs = _inputs(module.config, settings)
        with torch.inference_mode():
            eager, fast = module(**inputs)[0].float(), compiled.module(**inputs)[0].float()
        title += f"; compiled vs eager transformer output: max |diff| / max |eager| {(fast - eager).abs().max() / eager.abs().max():.1e}"
    timing_table(title, timings)


def comfyui_part(settings: Settings) -> None:
    root = procs.comfyui_root()
    if root is None:
        print("\nFill in ComfyUI's executor: skipped (set COMFYUI_ROOT to a ComfyUI checkout)")
        return
    layout = pack_module("pipelines.flux.layout")
    from tiny.core import save

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "diffusion_models").mkdir()
        (folder / "vae").mkdir()
        file_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[settings.extra.get("file_dtype", "fp32")]
        module = models.flux_transformer("fill", settings.flux_depth, file_dtype)
        save(layout.diffusers_transformer_to_bfl(module.state_dict()), folder / "diffusion_models" / "fill.safetensors",
             file_dtype)
        del module
        save(layout.diffusers_vae_to_bfl(models.flux_vae().state_dict()), folder / "vae" / "ae.safetensors",
             torch.bfloat16)
        size, steps, tokens = settings.size, settings.steps + 1, settings.text_tokens
        inputs = {"class_type": "EditKitBenchInputs", "inputs": {"size": size, "tokens": tokens, "width": 4096,
                                                                  "pooled": 768, "guidance": 30.0}}
        native = {
            "1": inputs,
            "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "fill.safetensors", "weight_dtype": "default"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
            "4": {"class_type": "InpaintModelConditioning",
                  "inputs": {"positive": ["1", 0], "negative": ["1", 1], "vae": ["3", 0], "pixels": ["1", 2],
                             "mask": ["1", 3], "noise_mask": True}},
            "5": {"class_type": "KSampler",
                  "inputs": {"model": ["2", 0], "seed": 1, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
                             "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 1],
                             "latent_image": ["4", 2], "denoise": 1.0}},
            "6": {"class_type": "EditKitBenchSink", "inputs": {"latent": ["5", 0]}},
        }

        def editkit(compile_setting: str, weight_dtype: str = "auto") -> dict:
            return {
                "1": inputs,
                "2": {"class_type": "EditKitFluxLoader",
                      "inputs": {"diffusers_folder": "(none)", "transformer_file": "fill.safetensors",
                                 "vae_file": "ae.safetensors", "clip_l_file": "(from folder)",
                                 "t5_file": "(from folder)", "weight_dtype": weight_dtype, "compile": compile_setting}},
                "5": {"class_type": "EditKitFluxFillInpaint",
                      "inputs": {"model": ["2", 0], "vae": ["2", 2], "conditioning": ["1", 0], "image": ["1", 2],
                                 "mask": ["1", 3], "seed": 1, "steps": steps, "guidance": 30.0, "denoise": 1.0,
                                 "batch_size": 1}},
                "6": {"class_type": "EditKitBenchSink", "inputs": {"latent": ["5", 1]}},
            }

        # an fp32 file: both store and compute fp32. A bf16 file: native ComfyUI stores its weights in fp32 on a CPU;
        # EditKit's auto keeps them bf16 (half the memory) and casts each layer per call (a third setup storing
        # fp32 did not fit beside them in 23 GB at 2+4 blocks)
        kept = " (bf16 kept)" if file_dtype == torch.bfloat16 else ""
        setups = {"native UNETLoader + KSampler": native, f"EditKit, weight_dtype auto{kept}": editkit("off")}
        if settings.extra.get("compile", True):
            setups["EditKit, compile=on"] = editkit("on")
        report = procs.child("comfy", {"comfyui": str(root), "models": str(folder), "steps": steps,
                                       "runs": settings.rounds, "setups": setups,
                                       "flags": ["--use-pytorch-cross-attention"]})
    comfy_table("FLUX.1-Fill in ComfyUI's executor (--cpu --use-pytorch-cross-attention), "
                f"{settings.flux_depth[0]}+{settings.flux_depth[1]} blocks, {settings.extra.get('file_dtype', 'fp32')} "
                f"file, {settings.describe()}", report)


def comfy_table(title: str, report: dict) -> None:
    import statistics

    reference = next(iter(report.values()))["s_per_step"]
    rows = []
    for label, values in report.items():
        samples = values["s_per_step"]
        ratios = [a / b for a, b in zip(samples, reference)]
        rows.append([label, statistics.median(samples), f"{min(samples):.4g}–{max(samples):.4g}",
                     statistics.median(ratios), f"{min(ratios):.3f}–{max(ratios):.3f}", values["first_run_s"],
                     statistics.median(values["peak_rss"]) / 2**20])
    print_table(title, ["setup", "s/step", "min–max", "ratio (median of runs)", "ratio min–max", "first run s",
                        "sampling peak RSS MiB"], rows)


def load_part(settings: Settings) -> None:
    layout = pack_module("pipelines.flux.layout")
    from tiny.core import save, write_gguf

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        bfl = layout.diffusers_transformer_to_bfl(models.flux_transformer("fill", settings.flux_depth,
                                                                          torch.bfloat16).state_dict())
        files = {"BFL bf16 .safetensors": Path(scratch) / "fill.safetensors",
                 "GGUF Q8_0": Path(scratch) / "fill-Q8_0.gguf"}
        save(bfl, files["BFL bf16 .safetensors"], torch.bfloat16)
        write_gguf(bfl, files["GGUF Q8_0"])
        del bfl
        for label, path in files.items():
            row = procs.child("load", {"family": "flux", "path": str(path),
                                       "storage": "bf16" if path.suffix == ".safetensors" else None})
            rows.append([label, row["file_bytes"] / 2**20, row["weights_bytes"] / 2**20,
                         row["rss_resident"] / 2**20, row["peak_rss_load"] / 2**20, row["load_s"]])
    print_table(f"Loading the {settings.flux_depth[0]}+{settings.flux_depth[1]}-block FLUX.1-Fill transformer "
                "(fresh process each; MiB above the RSS after imports)",
                ["file", "file MiB", "weights MiB", "RSS MiB", "peak RSS while loading MiB", "load s"], rows)


def share_part(settings: Settings) -> None:
    import time

    from .gguf import _inputs

    rows = []
    for depth in dict.fromkeys([(1, 1), settings.flux_depth]):
        module = models.flux_transformer("fill", depth, settings.dtype, settings.device)
        inputs = _inputs(module.config, settings)

        def call(module=module, inputs=inputs):
            with torch.inference_mode():
                module(**inputs)

        for which in ("torch's default", "EditKit's (core.matmul)"):
            if which.startswith("EditKit"):
                models.component(module, "bench-share", settings.dtype)  # adopts core.matmul's layers
            call()  # warm-up
            started = time.perf_counter()
            call()
            seconds = time.perf_counter() - started
            shares = time_shares(call)
            rows.append([f"{depth[0]}+{depth[1]}", which, seconds, f"{shares['matmuls']:.1%}",
                         f"{shares['attention']:.1%}", f"{shares['other']:.1%}"])
        del module
    print_table(f"Where a FLUX.1-Fill transformer call's operator time goes, {settings.size}², {settings.text_tokens} "
                f"text tokens, {settings.describe()}", ["blocks", "products", "s/call", "matmuls", "attention", "other"],
                rows)


def run(settings: Settings, parts=PARTS) -> None:
    for part in parts:
        {"steps": steps_part, "comfyui": comfyui_part, "share": share_part, "load": load_part}[part](settings)
