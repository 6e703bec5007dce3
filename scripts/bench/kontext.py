"""Kontext-inpaint: its sampler against Fill's on the same real-width model (only the input projection
differs: 192 features against 384, so a step should cost the same), and training steps per stage.

``steps``  Fill's sampler and the Kontext-inpaint sampler (a widened copy of the same transformer),
           alternating, seconds per step between step callbacks.
``train``  One optimizer step of the trainer's loss (``flow_matching_loss`` + backward + clip + AdamW) for
           stage 1 (x_embedder only) and stage 2 (all parameters), tiny model and real width at
           ``--flux-depth`` (256 px, 128 text tokens), with and without gradient checkpointing; each case in
           its own process so its peak RSS (VmHWM, reset after the model is built) is its own.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from . import models, procs
from .harness import Settings, StepClock, alternate, pack_module, print_table, sync, timing_table

PARTS = ("steps", "train")


def steps_part(settings: Settings) -> None:
    flow = pack_module("pipelines.flux.flow")
    runtime_mod = pack_module("pipelines.core.runtime")
    ki = pack_module("pipelines.flux.kontext_inpaint")
    scheduler = pack_module("pipelines.flux.family").FAMILY.scheduler_config(None)
    dtype, device = settings.dtype, settings.device
    fill = models.flux_transformer("fill", settings.flux_depth, dtype, device)
    kontext = ki.widen_fill_transformer(copy.deepcopy(fill))
    fill_c = models.component(fill, "bench-fill", dtype)
    kontext_c = models.component(kontext, "bench-kontext", dtype)
    h = w = settings.size // 8
    tokens = (h // 2) * (w // 2)
    g = torch.Generator().manual_seed(0)
    source, mask_latent = torch.randn(1, 16, h, w, generator=g), torch.randn(1, 16, h, w, generator=g)
    fill_cond = torch.randn(1, tokens, 320, generator=g)
    text = models.flux_text(fill.config, settings.text_tokens)
    steps = settings.steps + 1

    def run(which):
        def go():
            clock = StepClock(device)
            runtime = runtime_mod.TorchRuntime(device, on_progress=clock.tick)
            clock.start()
            if which == "kontext":
                ki.edit(kontext_c, source, mask_latent, text, steps=steps, guidance=30.0, seed=0, denoise=1.0,
                        scheduler_config=scheduler, runtime=runtime)
            else:
                inputs = flow.FlowInputs(noise=flow.pack(flow.noise_like((1, 16, h, w), 0)), text=text.states,
                                         pooled=text.pooled, guidance=30.0, latent_h=h, latent_w=w, cond=fill_cond)
                with torch.inference_mode():
                    flow.denoise(fill_c, inputs, flow.flux_schedule(steps, tokens, scheduler), runtime)
            return clock.per_step()

        return go

    d, s = settings.flux_depth
    timing_table(f"Kontext-inpaint sampler against Fill's, {d}+{s} blocks, {settings.text_tokens} text tokens, "
                 f"{settings.describe()}", alternate({"FLUX.1-Fill (384 features)": run("fill"),
                                                      "Kontext-inpaint (192 features)": run("kontext")},
                                                     settings.rounds, device=device))


def train_job(case: dict) -> dict:
    """Child process: time training steps of one case and report its peak memory."""
    train = pack_module("pipelines.flux.kontext_inpaint.train")
    train_config = pack_module("pipelines.flux.kontext_inpaint.config")
    ki = pack_module("pipelines.flux.kontext_inpaint")
    device, dtype = torch.device(case["device"]), getattr(torch, case["dtype"])
    if case["model"] == "tiny":
        from diffusers import FluxTransformer2DModel

        from tiny.core import randomize_
        from tiny.flux1 import TINY_TRANSFORMER

        torch.manual_seed(0)
        model = FluxTransformer2DModel(**TINY_TRANSFORMER)
        randomize_(model, torch.Generator().manual_seed(0))
        model = model.to(device=device, dtype=dtype)
    else:
        model = models.flux_transformer("fill", tuple(case["depth"]), dtype, device).requires_grad_(True)
    ki.widen_fill_transformer(model)
    params = train.set_trainable(model, case["stage"])
    if case["checkpointing"]:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = train.make_optimizer(train_config.TrainSettings(optimizer="adamw"), params, 1e-5)
    h = w = case["size"] // 8
    g = torch.Generator().manual_seed(0)
    config = model.config
    batch = {"target": torch.randn(1, 16, h, w, generator=g), "source": torch.randn(1, 16, h, w, generator=g),
             "mask": torch.randn(1, 16, h, w, generator=g),
             "text": torch.randn(1, case["text_length"], config.joint_attention_dim, generator=g),
             "pooled": torch.randn(1, config.pooled_projection_dim, generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}
    before = procs.status_bytes("VmRSS")
    procs.reset_peak_rss()
    durations = []
    for index in range(case["steps"] + 1):  # the first step (optimizer state allocation) is not timed
        sync(device)
        start = time.perf_counter()
        noise, t = train.sample_noise_and_t((1, 16, h, w), 0, index)
        loss = train.flow_matching_loss(model, batch, noise.to(device), t.to(device), 30.0, dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        if index:
            durations.append(time.perf_counter() - start)
    return {"trainable_m": sum(p.numel() for p in params) / 1e6, "total_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "s_per_step": statistics.median(durations), "training_mib": (procs.status_bytes("VmHWM") - before) / 2**20}


def train_part(settings: Settings) -> None:
    dtype = "float32" if settings.dtype == torch.float32 and settings.device.type == "cuda" else "bfloat16"
    rows = []
    cases = [("tiny", 64, 64, 3, False, "float32")]
    cases += [("real width", 128 if settings.quick else 256, 128, 1 if settings.quick else 2, gc, dtype)
              for gc in (False, True)]
    for model, size, text_length, steps, checkpointing, case_dtype in cases:
        for stage in (1, 2):
            row = procs.child("kontext:train_job", {
                "model": "tiny" if model == "tiny" else "real", "depth": list(settings.flux_depth), "stage": stage,
                "checkpointing": checkpointing, "size": size, "text_length": text_length, "steps": steps,
                "device": str(settings.device), "dtype": case_dtype})
            rows.append([model, case_dtype, f"{size}px", stage, checkpointing, row["trainable_m"], row["total_m"],
                         row["s_per_step"], row["training_mib"]])
    d, s = settings.flux_depth
    print_table(f"Kontext-inpaint training step (AdamW), real width = {d}+{s} blocks; one process per row",
                ["model", "dtype", "size", "stage", "checkpointing", "trainable M", "total M", "s/step",
                 "memory added by training MiB"], rows)


def run(settings: Settings, parts=PARTS) -> None:
    for part in parts:
        {"steps": steps_part, "train": train_part}[part](settings)
