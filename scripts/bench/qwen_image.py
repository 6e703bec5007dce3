"""Qwen-Image-Edit-2509: EditKit's edit sampler against diffusers' QwenImageEditPlusPipeline (true CFG 4:
EditKit batched into one call per step, and unbatched), prompt encoding with pictures, loading memory.

``steps``  The same transformer, noise and prompt states on all sides; the picture's reference copy is
           ``size``² everywhere (diffusers' ``VAE_IMAGE_SIZE`` set to it), so the transformer sees the
           same tokens; the tests' tiny VAE (only steps are timed, between step callbacks). The negative
           is shorter than the prompt (EditKit pads and masks it when batching).
``2511``   Qwen-Image-Edit-2511 against 2509: the same transformer weights with diffusers' ``zero_cond_t``
           off (2509) and on (2511, a second timestep-0 modulation for the reference tokens), EditKit
           2509, EditKit 2511 and diffusers' 2511 ``QwenImageEditPlusPipeline``, true CFG 4 as two calls
           per step on all three (same inputs as ``steps``); also the largest difference between
           EditKit's and diffusers' 2511 pictures (tiny VAE).
``encode`` The tests' tiny Qwen2.5-VL encodes an instruction with 1 and 3 pictures, then again (cached).
``load``   ComfyUI-layout bf16 ``.safetensors`` and GGUF Q8_0 loaded by EditKit in a fresh process.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from . import models, procs
from .harness import Settings, StepClock, alternate, pack_module, print_table, products, timing_table

PARTS = ("steps", "2511", "encode", "load")
SEED = 1234


class _Prompts:
    """Stands in for the text encoder: the same fixed states for both pipelines."""

    def __init__(self, states):
        self.states = states

    def encode(self, prompt, pictures, variant, runtime):
        return self.states[prompt]


def _inputs(settings: Settings):
    import numpy as np

    g = torch.Generator().manual_seed(SEED)
    cond = torch.randn(1, settings.text_tokens, 3584, generator=g)
    uncond = torch.randn(1, max(8, settings.text_tokens // 8), 3584, generator=g)
    array = np.random.default_rng(SEED).integers(0, 256, (settings.size, settings.size, 3), dtype=np.uint8)
    pixels = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return cond, uncond, array, pixels


def _modules():
    """The pack modules both edit benchmarks drive: runtime, loading, sizes, edit."""
    return tuple(pack_module(f"pipelines.{name}") for name in
                 ("core.runtime", "qwen_image.loading", "qwen_image.sizes", "qwen_image.edit"))


def compare_2511_part(settings: Settings) -> None:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    from tiny.qwen_image import FAMILY

    core, loading, sizes, edit = _modules()
    size, device, steps = settings.size, settings.device, settings.steps + 1
    tiny = FAMILY.components()
    base = models.qwen_transformer(settings.qwen_depth, settings.dtype, device)
    zero = models.qwen_transformer_2511(settings.qwen_depth, settings.dtype, device)
    vae = core.Component(tiny["vae"], "vae", "tiny", torch.float32)
    cond, uncond, array, pixels = _inputs(settings)
    prompts = _Prompts({"edit": cond, " ": uncond})
    pipe = QwenImageEditPlusPipeline(scheduler=tiny["scheduler"], vae=tiny["vae"], text_encoder=None, tokenizer=None,
                                     processor=None, transformer=zero)
    pipe.set_progress_bar_config(disable=True)
    pictures = {}

    def editkit_run(module, variant):
        component = core.Component(module, "diffusion", f"bench-{variant}", settings.dtype)

        def run():
            clock = StepClock(device)
            runtime = core.TorchRuntime(device, on_progress=clock.tick)
            clock.start()
            result = edit.edit(component, prompts, vae, [pixels], "edit", runtime, variant=variant,
                               scheduler_config=pack_module("pipelines.qwen_image.family").FAMILY.scheduler_config(None), negative_prompt=" ",
                               true_cfg_scale=4.0, steps=steps, seed=SEED, cfg_batched=False,
                               output=sizes.OutputSize(sizes.EXPLICIT, size, size, 64.0),
                               references=sizes.ReferenceSizes(sizes.CUSTOM, 384 * 384, size * size))
            pictures[variant] = result.images
            return clock.per_step()

        return run

    def diffusers_run():
        plus.VAE_IMAGE_SIZE = size * size
        clock = StepClock(device)
        clock.start()
        with torch.inference_mode():
            out = pipe(image=[Image.fromarray(array)], prompt_embeds=cond, negative_prompt_embeds=uncond,
                       true_cfg_scale=4.0, height=size, width=size, num_inference_steps=steps,
                       generator=torch.Generator().manual_seed(SEED), output_type="pt", callback_on_step_end=clock.tick)
        pictures["diffusers"] = out.images
        return clock.per_step()

    timings = alternate({"EditKit 2509 (zero_cond_t off)": editkit_run(base, loading.EDIT_2509),
                         "EditKit 2511 (zero_cond_t on)": editkit_run(zero, loading.EDIT_2511),
                         "diffusers 2511 QwenImageEditPlusPipeline": products(diffusers_run)}, settings.rounds, device=device)
    ours, theirs = pictures[loading.EDIT_2511].float().cpu(), pictures["diffusers"].float().cpu()
    difference = (ours.reshape(theirs.shape) - theirs).abs().max().item()
    timing_table(f"Qwen-Image-Edit-2511 against 2509, real width, {settings.qwen_depth} blocks, {size}² output + "
                 f"{size}² reference, {settings.text_tokens} text tokens, true CFG 4 as 2 calls/step, "
                 f"{settings.describe()}; EditKit 2511 vs diffusers 2511 pictures: max |diff| {difference:.1e}",
                 timings)


def steps_part(settings: Settings) -> None:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
    import numpy as np
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    from tiny.qwen_image import FAMILY

    core, loading, sizes, edit = _modules()
    size, device, steps = settings.size, settings.device, settings.steps + 1
    tiny = FAMILY.components()
    module = models.qwen_transformer(settings.qwen_depth, settings.dtype, device)
    component = core.Component(module, "diffusion", "bench-qwen", settings.dtype)
    vae = core.Component(tiny["vae"], "vae", "tiny", torch.float32)
    g = torch.Generator().manual_seed(SEED)
    cond = torch.randn(1, settings.text_tokens, 3584, generator=g)
    uncond = torch.randn(1, max(8, settings.text_tokens // 8), 3584, generator=g)
    array = np.random.default_rng(SEED).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    prompts = _Prompts({"edit": cond, " ": uncond})
    pipe = QwenImageEditPlusPipeline(scheduler=tiny["scheduler"], vae=tiny["vae"], text_encoder=None, tokenizer=None,
                                     processor=None, transformer=module)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_run():
        plus.VAE_IMAGE_SIZE = size * size
        clock = StepClock(device)
        clock.start()
        with torch.inference_mode():
            pipe(image=[Image.fromarray(array)], prompt_embeds=cond, negative_prompt_embeds=uncond, true_cfg_scale=4.0,
                 height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(SEED),
                 output_type="latent", callback_on_step_end=clock.tick)
        return clock.per_step()

    def editkit_run(batched: bool):
        def run():
            clock = StepClock(device)
            runtime = core.TorchRuntime(device, on_progress=clock.tick)
            clock.start()
            edit.edit(component, prompts, vae, [pixels], "edit", runtime, scheduler_config=pack_module("pipelines.qwen_image.family").FAMILY.scheduler_config(None),
                      negative_prompt=" ", true_cfg_scale=4.0, steps=steps, seed=SEED, cfg_batched=batched,
                      output=sizes.OutputSize(sizes.EXPLICIT, size, size, 64.0),
                      references=sizes.ReferenceSizes(sizes.CUSTOM, 384 * 384, size * size))
            return clock.per_step()

        return run

    timings = alternate({"diffusers QwenImageEditPlusPipeline (2 calls/step)": products(diffusers_run),
                         "EditKit, true CFG batched (1 call/step)": editkit_run(True),
                         "EditKit, true CFG unbatched (2 calls/step)": editkit_run(False),
                         "EditKit, unbatched, torch's default products": products(editkit_run(False))},
                        settings.rounds)
    timing_table(f"Qwen-Image-Edit-2509, real width, {settings.qwen_depth} blocks, {size}² output + {size}² reference, "
                 f"{settings.text_tokens} text tokens, true CFG 4, {settings.describe()}", timings)


def encode_part(settings: Settings) -> None:
    from tiny.qwen_image import FAMILY

    sizes = pack_module("pipelines.qwen_image.sizes")
    text = pack_module("pipelines.qwen_image.text")
    core = pack_module("pipelines.core.runtime")
    tiny = FAMILY.components()
    encoder = text.QwenTextEncoder(core.Component(tiny["text_encoder"].model, "text_encoder", "tiny", torch.float32),
                                   tiny["tokenizer"], tiny["processor"].image_processor)
    runtime = core.TorchRuntime("cpu")
    g = torch.Generator().manual_seed(SEED)
    pictures = [sizes.vl_copy(torch.rand(1, 3, 512, 512, generator=g), 384, 384) for _ in range(3)]
    encoder.encode("warm up", pictures[:1], "Qwen-Image-Edit-2509", runtime)
    rows = []
    for count in (1, 3):
        for label in ("first run", "cached re-run"):
            started = time.perf_counter()
            states = encoder.encode("change the blue tracksuit to red", pictures[:count], "Qwen-Image-Edit-2509",
                                    runtime)
            rows.append([f"{count} picture(s), {label} ({states.shape[1]} tokens)", time.perf_counter() - started])
    print_table("Qwen prompt encoding with pictures (tiny Qwen2.5-VL, 384² vision copies)", ["case", "s"], rows)


def load_part(settings: Settings) -> None:
    from tiny import qwen_image
    from tiny.core import comfy_keys, save, write_gguf

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        sd = models.qwen_transformer(settings.qwen_depth, torch.bfloat16).state_dict()
        files = {"bf16 .safetensors (ComfyUI layout)": Path(scratch) / "qwen_bf16.safetensors",
                 "GGUF Q8_0": Path(scratch) / "qwen-Q8_0.gguf"}
        save(comfy_keys(sd), files["bf16 .safetensors (ComfyUI layout)"], torch.bfloat16)
        write_gguf({k: v.float() for k, v in sd.items()}, files["GGUF Q8_0"], arch="qwen_image",
                   name=qwen_image.FOLDER)
        del sd
        for label, path in files.items():
            row = procs.child("load", {"family": "qwen", "path": str(path),
                                       "storage": "bf16" if path.suffix == ".safetensors" else None})
            rows.append([label, row["file_bytes"] / 2**20, row["weights_bytes"] / 2**20, row["rss_resident"] / 2**20,
                         row["peak_rss_load"] / 2**20, row["load_s"]])
    print_table(f"Loading the {settings.qwen_depth}-block Qwen-Image transformer (fresh process each; MiB above the "
                "RSS after imports)", ["file", "file MiB", "weights MiB", "RSS MiB", "peak RSS while loading MiB",
                                       "load s"], rows)


def run(settings: Settings, parts=PARTS) -> None:
    for part in parts:
        {"steps": steps_part, "2511": compare_2511_part, "encode": encode_part, "load": load_part}[part](settings)
