"""Per-step cost of applied LoRAs against none: one FLUX.1-Fill transformer call with no LoRA and with a
rank-16 and a rank-64 LoRA on every attention and MLP linear of every block, applied exactly as the
samplers apply them (``pipelines.core.lora.applied_loras``; the apply cost, once per sampler run, is
included in each sample and reported alone in the last column)."""

from __future__ import annotations

import statistics
import time

import torch

from . import models
from .gguf import _inputs
from .harness import Settings, alternate, pack_module, timing_table

PARTS = ("calls",)
TARGET_ENDINGS = (
    ".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out.0", ".attn.add_q_proj", ".attn.add_k_proj",
    ".attn.add_v_proj", ".attn.to_add_out", ".ff.net.0.proj", ".ff.net.2", ".ff_context.net.0.proj",
    ".ff_context.net.2", ".proj_mlp", ".proj_out",
)


def lora_for(model, rank: int, seed: int = 0):
    """A LoRA of ``rank`` on every attention and MLP linear of every block (LoraWeights, in memory)."""
    lora = pack_module("pipelines.core.lora")
    family = pack_module("pipelines.flux.lora").FLUX_LORA
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks.")) \
                and name.endswith(TARGET_ENDINGS):
            layers[name] = lora.LoraLayer(torch.randn(rank, module.in_features, generator=g) * 0.01,
                                          torch.randn(module.out_features, rank, generator=g) * 0.01, 1.0)
    return lora.LoraWeights(f"rank{rank}", family, layers)


def calls_part(settings: Settings) -> None:
    lora = pack_module("pipelines.core.lora")
    module = models.flux_transformer("fill", settings.flux_depth, settings.dtype, settings.device)
    component = models.component(module, "bench-lora", settings.dtype)
    inputs = _inputs(module.config, settings)
    configs = {"no LoRA": ()}
    for rank in (16, 64):
        configs[f"rank {rank}"] = ((lora_for(module, rank), 1.0),)
    apply_cost = {name: [] for name in configs}

    def case(name):
        def run():
            started = time.perf_counter()
            with torch.inference_mode(), lora.applied_loras(component, configs[name]):
                apply_cost[name].append(time.perf_counter() - started)
                module(**inputs)

        return run

    timings = alternate({name: case(name) for name in configs}, settings.rounds, device=settings.device)
    d, s = settings.flux_depth
    timing_table(f"LoRA on every attention/MLP linear, FLUX.1-Fill {d}+{s} blocks, {settings.size}², "
                 f"{settings.text_tokens} text tokens, {settings.describe()}", timings, unit="s/call",
                 extra={name: {"layers": sum(len(w.layers) for w, _ in configs[name]),
                               "apply s (once per run)": statistics.median(apply_cost[name])} for name in configs})


def run(settings: Settings, parts=PARTS) -> None:
    for part in parts:
        {"calls": calls_part}[part](settings)
