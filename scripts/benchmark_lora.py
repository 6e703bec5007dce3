"""Benchmark the per-step cost of an applied LoRA against none (not a test; prints a table).

    python scripts/benchmark_lora.py [--size 256] [--text-tokens 128] [--repeats 5] [--dtype fp32]
                                     [--device cpu] [--skip-shallow]

For the tiny test transformer and for a real-width but shallow FLUX.1-Fill transformer (24x128 heads,
T5/CLIP widths 4096/768, 1 double + 1 single block, built as scripts/benchmark_fill.py builds it: every
layer has its real size, so the relative cost per block is FLUX.1-Fill-dev's), one transformer call
(= one sampling step without CFG) is timed with no LoRA and with a rank-16 and a rank-64 LoRA on every
attention and MLP linear of every block (q, k, v, out and the context-stream projections, the MLPs,
single blocks' proj_mlp and proj_out), applied exactly as samplers apply them (forward hooks from
``pipelines.core.lora.applied_loras``). Calls are interleaved over the configurations and the median
reported, with the ratio to no LoRA from the same run. On the CPU the primary figure is the process's
CPU time per call (``time.process_time``, which a machine shared with other jobs barely disturbs), with
the fastest wall-clock call beside it; on CUDA both are wall-clock. The one-off cost of applying
(combining the LoRA matrices and registering the hooks, once per sampler run) is reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from packload import offline, pack_module  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_ENDINGS = (
    ".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out.0", ".attn.add_q_proj", ".attn.add_k_proj",
    ".attn.add_v_proj", ".attn.to_add_out", ".ff.net.0.proj", ".ff.net.2", ".ff_context.net.0.proj",
    ".ff_context.net.2", ".proj_mlp", ".proj_out",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def lora_for(model, rank: int, seed: int = 0):
    """A LoRA of ``rank`` on every attention and MLP linear of every block (LoraWeights, in memory)."""
    lora = pack_module("pipelines.core.lora")
    family = pack_module("pipelines.flux.lora").FLUX_LORA
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks.")) \
                and name.endswith(TARGET_ENDINGS):
            down = torch.randn(rank, module.in_features, generator=g) * 0.01
            up = torch.randn(module.out_features, rank, generator=g) * 0.01
            layers[name] = lora.LoraLayer(down, up, 1.0)
    return lora.LoraWeights(f"rank{rank}", family, layers)


def model_inputs(model, size: int, text_tokens: int, device, dtype) -> dict:
    cfg = model.config
    tokens = (size // 16) ** 2
    g = torch.Generator().manual_seed(1)
    side = size // 16
    img_ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // side, torch.arange(tokens) % side], -1)
    return dict(
        hidden_states=torch.randn(1, tokens, cfg.in_channels, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([30.0], device=device, dtype=torch.float32),
        img_ids=img_ids.float().to(device), txt_ids=torch.zeros(text_tokens, 3, device=device), return_dict=False,
    )


def bench(label: str, model, dtype, device, size: int, text_tokens: int, repeats: int) -> list[dict]:
    lora = pack_module("pipelines.core.lora")
    runtime = pack_module("pipelines.core.runtime")
    component = runtime.Component(model, "diffusion", label, dtype)
    inputs = model_inputs(model, size, text_tokens, device, dtype)
    configs = {"none": ()}
    for rank in (16, 64):
        weights = lora_for(model, rank)
        configs[f"rank {rank}"] = ((weights, 1.0),)
    times: dict[str, list[float]] = {name: [] for name in configs}
    walls: dict[str, list[float]] = {name: [] for name in configs}
    apply_cost: dict[str, list[float]] = {name: [] for name in configs}
    with torch.inference_mode():
        for rep in range(repeats + 1):  # the first round warms up
            for name, loras in configs.items():
                start = time.perf_counter()
                with lora.applied_loras(component, loras):
                    applied = time.perf_counter()
                    _sync(device)
                    c0, t0 = time.process_time(), time.perf_counter()
                    model(**inputs)
                    _sync(device)
                    c1, t1 = time.process_time(), time.perf_counter()
                if rep:
                    times[name].append(t1 - t0 if device.type == "cuda" else c1 - c0)
                    walls[name].append(t1 - t0)
                    apply_cost[name].append(applied - start)
    base = statistics.median(times["none"])
    rows = []
    for name in configs:
        median = statistics.median(times[name])
        layers = sum(len(w.layers) for w, _ in configs[name])
        rows.append(dict(model=label, lora=name, layers=layers, step_s=median, ratio=median / base,
                         wall_s=min(walls[name]), wall_ratio=min(walls[name]) / min(walls["none"]),
                         apply_s=statistics.median(apply_cost[name])))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="picture side in pixels (tokens = (size/16)^2)")
    parser.add_argument("--text-tokens", type=int, default=128, help="T5 tokens (FLUX.1 uses up to 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest CPU times)")
    parser.add_argument("--skip-shallow", action="store_true", help="tiny model only (fast)")
    args = parser.parse_args(argv)
    offline()
    torch.set_num_threads(args.threads)
    from diffusers import FluxTransformer2DModel

    from make_tiny_models import TINY_TRANSFORMER, shallow_fill_transformer

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    models = [("tiny", FluxTransformer2DModel(**TINY_TRANSFORMER).eval().requires_grad_(False))]
    if not args.skip_shallow:
        models.append(("shallow real-width", shallow_fill_transformer(dtype)))
    rows = []
    for label, model in models:
        rows += bench(label, model.to(device, dtype), dtype, device, args.size, args.text_tokens, args.repeats)
    print(f"device {device}, {args.dtype}, {args.size}x{args.size} ({(args.size // 16) ** 2} image tokens) + "
          f"{args.text_tokens} text tokens, median of {args.repeats}, threads {torch.get_num_threads()}")
    timed = "wall s/step" if device.type == "cuda" else "CPU s/step"
    print(f"{'model':<20} {'LoRA':<8} {'layers':>6} {timed:>12} {'vs none':>8} {'min wall s':>11} {'vs none':>8} "
          f"{'apply (once/run)':>17}")
    for r in rows:
        print(f"{r['model']:<20} {r['lora']:<8} {r['layers']:>6} {r['step_s']:>12.4f} {r['ratio']:>8.3f} "
              f"{r['wall_s']:>11.4f} {r['wall_ratio']:>8.3f} {r['apply_s']:>15.4f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
