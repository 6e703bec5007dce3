"""Benchmark the FLUX.1 Redux prior and what it saves (not a test; prints tables).

    python scripts/benchmark_redux.py [--device cpu|cuda] [--size 256] [--steps 3] [--skip-memory]

1. Prior time per picture (SigLIP + Redux embedder, batch of 4 pictures, after a warm-up), on the tiny test
   SigLIP (27x27 tokens) with a tiny embedder, and on a real-width prior: SigLIP so400m's real layer size
   (width 1152, 16 heads, MLP 4304, 384 px → 729 tokens) with 1 of its 27 layers, and the Redux embedder at its
   real size (1152 → 12288 → 4096, 64 M parameters). The full prior's time is about the embedder's plus 27
   times one SigLIP layer's; the table reports both parts.
2. EditKit · Flux Sampler's time per step with a Redux conditioning of 729 picture tokens (downsampling 1) and
   of 81 (downsampling 3), both after diffusers' 512 zero T5 tokens, on a real-width shallow FLUX.1-dev
   transformer (24x128 heads, 1 double + 1 single block) at --size. Steps are timed between consecutive step
   callbacks, so the prior and the VAE are excluded.
3. Peak memory (RSS above the process's after imports; fresh process each) of a Redux-only run (shallow
   real-width transformer, real-width prior, one sampler step, no text encoder) against the same run that also
   loads T5 + CLIP (real-width shallow: T5-XXL's width 4096 with 1 of 24 blocks and its 32128-token embedding,
   CLIP-L with 1 of 12 layers) from single files through EditKit · Flux Loader and encodes a prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_fill import StepClock, _proc_status_bytes  # noqa: E402

from packload import pack_module  # noqa: E402

REAL_SIGLIP_LAYER = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16,
                         image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SHALLOW_T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                  relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                  is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
SHALLOW_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def _prior(siglip: dict, width: int, dtype: torch.dtype):
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from tiny_redux_models import tiny_processor
    from transformers import SiglipVisionConfig, SiglipVisionModel

    loading = pack_module("pipelines.flux.redux.loading")
    runtime = pack_module("pipelines.core.runtime")
    torch.manual_seed(0)
    encoder = SiglipVisionModel(SiglipVisionConfig(**siglip)).to(dtype).eval()
    embedder = ReduxImageEncoder(redux_dim=siglip["hidden_size"], txt_in_features=width).to(dtype).eval()
    return loading.ReduxPrior(runtime.Component(encoder, "text_encoder", "siglip", dtype),
                              runtime.Component(embedder, "text_encoder", "redux", dtype),
                              tiny_processor(siglip["image_size"]))


def time_prior(prior, device, repeats: int = 3) -> dict:
    """Seconds per picture for SigLIP and for the embedder (batch of 4, median of ``repeats``)."""
    prior_mod = pack_module("pipelines.flux.redux.prior")
    preprocess = pack_module("pipelines.flux.redux.preprocess")
    runtime = pack_module("pipelines.core.runtime").TorchRuntime(device)
    pictures = [preprocess.to_pil(torch.rand(3, 480, 640)) for _ in range(4)]
    values = preprocess.pixel_values(pictures, prior.processor)
    encoder, embedder = prior.encoder, prior.embedder
    runtime.acquire(encoder)
    runtime.acquire(embedder)
    timings = {"preprocess": [], "siglip": [], "embedder": []}
    with torch.inference_mode():
        prior_mod.image_tokens(prior, values, runtime)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            values = preprocess.pixel_values(pictures, prior.processor)
            t1 = time.perf_counter()
            hidden = encoder.module(pixel_values=values.to(device, encoder.dtype)).last_hidden_state
            _sync(device)
            t2 = time.perf_counter()
            embedder.module(hidden).image_embeds.float().cpu()
            t3 = time.perf_counter()
            for key, value in (("preprocess", t1 - t0), ("siglip", t2 - t1), ("embedder", t3 - t2)):
                timings[key].append(value / len(pictures))
    return {k: statistics.median(v) for k, v in timings.items()}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def shallow_dev_transformer(dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    from make_tiny_models import SHALLOW_TRANSFORMER

    torch.manual_seed(0)
    return FluxTransformer2DModel(**dict(SHALLOW_TRANSFORMER, in_channels=64)).to(dtype).eval().requires_grad_(False)


def time_sampler(component, vae, image_tokens: int, size: int, steps: int, device) -> float:
    generate = pack_module("pipelines.flux.generate")
    conditioning = pack_module("pipelines.flux.conditioning")
    runtime_mod = pack_module("pipelines.core.runtime")
    loading = pack_module("pipelines.flux.loading")
    g = torch.Generator().manual_seed(0)
    states = torch.cat([torch.zeros(1, 512, 4096), torch.randn(1, image_tokens, 4096, generator=g)], dim=1)
    text = conditioning.FluxText(states, torch.zeros(1, 768), None)
    settings = generate.GenerateSettings(steps=steps, guidance=2.5, seed=42)
    with StepClock(component.module, torch.device(device)) as clock:
        runtime = runtime_mod.TorchRuntime(device, on_progress=lambda *a: clock.step_done())
        generate.generate(component, vae, text, width=size, height=size, settings=settings,
                          scheduler_config=loading.scheduler_config(None), runtime=runtime)
    return clock.seconds_per_step()


# --------------------------------------------------------------------------------------
# Memory (child processes)


def write_memory_files(folder: Path) -> dict[str, Path]:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    from make_tiny_models import _save

    layout = pack_module("pipelines.flux.layout")
    files = {
        "transformer": folder / "diffusion_models" / "shallow-dev.safetensors",
        "siglip": folder / "clip_vision" / "siglip-1layer.safetensors",
        "redux": folder / "style_models" / "flux1-redux-dev.safetensors",
        "clip": folder / "text_encoders" / "clip-l-1layer.safetensors",
        "t5": folder / "text_encoders" / "t5xxl-1block.safetensors",
    }
    torch.manual_seed(0)
    _save(layout.diffusers_transformer_to_bfl(shallow_dev_transformer(torch.bfloat16).state_dict()),
          files["transformer"], torch.bfloat16)
    siglip = SiglipVisionModel(SiglipVisionConfig(**REAL_SIGLIP_LAYER)).state_dict()
    _save({f"vision_model.{k}": v for k, v in siglip.items()}, files["siglip"], torch.bfloat16)
    _save(ReduxImageEncoder().state_dict(), files["redux"], torch.bfloat16)
    clip = CLIPTextModel(CLIPTextConfig(**SHALLOW_CLIP)).state_dict()
    _save({f"text_model.{k}" if not k.startswith("text_model.") else k: v for k, v in clip.items()
           if not k.endswith("position_ids")}, files["clip"], torch.bfloat16)
    t5 = T5EncoderModel(T5Config(**SHALLOW_T5)).state_dict()
    _save({k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"}, files["t5"], torch.bfloat16)
    return files


def measure_run(spec: str, device: str) -> dict:
    """Child-process mode: one Redux variation through EditKit's loaders, with or without text encoders."""
    options = json.loads(spec)
    files = {k: Path(v) for k, v in options["files"].items()}
    flux_loading = pack_module("pipelines.flux.loading")
    redux_loading = pack_module("pipelines.flux.redux.loading")
    prior_mod = pack_module("pipelines.flux.redux.prior")
    generate = pack_module("pipelines.flux.generate")
    conditioning = pack_module("pipelines.flux.conditioning")
    text_mod = pack_module("pipelines.flux.text")
    runtime = pack_module("pipelines.core.runtime").TorchRuntime(device)
    import diffusers  # noqa: F401  (imported before the baseline)
    import transformers  # noqa: F401

    dtype = torch.bfloat16
    baseline = _proc_status_bytes("VmRSS")
    transformer = flux_loading.transformer_source(None, files["transformer"], dtype).get()
    vae = flux_loading.vae_source(Path(options["fill_folder"]), None, torch.float32).get()
    prior = redux_loading.ReduxModel(None, files["siglip"], files["redux"], dtype).prior.get()
    picture = torch.rand(1, 3, 480, 640)
    tokens = prior_mod.encode(prior, picture, prior_mod.ReduxSettings(), runtime).tokens
    if options["text"]:
        encoders = text_mod.text_encoder_source(Path(options["fill_folder"]), files["clip"], files["t5"], dtype)
        states, pooled = encoders.get().encode(["a watercolor painting"], runtime, 512)
        cond = prior_mod.append_to_conditioning(conditioning.make_conditioning(states, pooled), tokens)
    else:
        states, pooled = prior_mod.zero_text(4096, 768)
        cond = prior_mod.append_to_conditioning(conditioning.make_conditioning(states, pooled), tokens)
    text = conditioning.read_conditioning(cond)
    settings = generate.GenerateSettings(steps=1, guidance=2.5, seed=42)
    generate.generate(transformer, vae, text, width=128, height=128, settings=settings,
                      scheduler_config=flux_loading.scheduler_config(None), runtime=runtime)
    return {"peak_rss_bytes": _proc_status_bytes("VmHWM") - baseline, "tokens": int(text.states.shape[1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256, help="sampler picture side (multiple of 16)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-sampler", action="store_true")
    parser.add_argument("--measure-run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_run:
        print(json.dumps(measure_run(args.measure_run, args.device)))
        return 0

    from tiny_redux_models import TINY_SIGLIP

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prior_rows = []
    for label, siglip, width in (("tiny SigLIP + tiny embedder", TINY_SIGLIP, 32),
                                 ("real-width: 1 SigLIP layer + real embedder", REAL_SIGLIP_LAYER, 4096)):
        prior_rows.append((label, time_prior(_prior(siglip, width, dtype), device)))

    sampler_rows = []
    memory = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        from make_tiny_models import make_tiny_models

        make_tiny_models(scratch / "models")
        fill_folder = scratch / "models" / "diffusers" / "FLUX.1-Fill-dev"
        if not args.skip_sampler:
            runtime_mod = pack_module("pipelines.core.runtime")
            loading = pack_module("pipelines.flux.loading")
            vae = loading.vae_source(fill_folder, None, dtype).get()
            component = runtime_mod.Component(shallow_dev_transformer(dtype), "diffusion", "shallow-dev", dtype)
            time_sampler(component, vae, 81, args.size, 2, device)  # warm-up
            for tokens in (729, 81):
                sampler_rows.append((tokens, time_sampler(component, vae, tokens, args.size, args.steps, device)))
            del component
        if not args.skip_memory:
            files = write_memory_files(scratch / "bench")
            for name, text in (("Redux only (no text encoder)", False), ("Redux + T5 + CLIP", True)):
                spec = json.dumps({"files": {k: str(v) for k, v in files.items()}, "text": text,
                                   "fill_folder": str(fill_folder)})
                out = subprocess.run([sys.executable, __file__, "--measure-run", spec, "--device", args.device],
                                     capture_output=True, text=True, check=True)
                memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
            memory["_text_file_bytes"] = files["clip"].stat().st_size + files["t5"].stat().st_size

    print(f"\nRedux prior, seconds per picture (batch of 4, {args.device}, {dtype}):")
    print(f"{'prior':44s} {'preprocess':>11s} {'SigLIP':>9s} {'embedder':>9s}")
    for label, row in prior_rows:
        print(f"{label:44s} {row['preprocess']:11.4f} {row['siglip']:9.4f} {row['embedder']:9.4f}")
    real = prior_rows[-1][1]
    print(f"full real prior ≈ preprocess + 27 x SigLIP layer + embedder = "
          f"{real['preprocess'] + 27 * real['siglip'] + real['embedder']:.3f} s/picture (estimate)")
    if sampler_rows:
        image_tokens = (args.size // 16) ** 2
        print(f"\nEditKit · Flux Sampler on a real-width shallow FLUX.1-dev transformer ({args.size}x{args.size} = "
              f"{image_tokens} image tokens, 512 zero T5 tokens, {args.steps} steps, {args.device}, {dtype}):")
        print(f"{'Redux tokens':>13s} {'sequence':>9s} {'s/step':>8s}")
        for tokens, seconds in sampler_rows:
            print(f"{tokens:13d} {512 + tokens + image_tokens:9d} {seconds:8.3f}")
        print(f"ratio 729 / 81 tokens: {sampler_rows[0][1] / sampler_rows[1][1]:.2f}")
    if memory:
        text_bytes = memory.pop("_text_file_bytes")
        print("\nPeak RSS of one Redux variation (fresh process each; shallow real-width models, bf16):")
        for name, row in memory.items():
            print(f"{name:32s} {row['peak_rss_bytes'] / 2**20:8.0f} MB   ({row['tokens']} conditioning tokens)")
        rows = list(memory.values())
        print(f"difference: {(rows[1]['peak_rss_bytes'] - rows[0]['peak_rss_bytes']) / 2**20:.0f} MB "
              f"(shallow text encoder files: {text_bytes / 2**20:.0f} MB; the real T5-XXL + CLIP-L are ~9.8 GB "
              "in bf16, none of which a Redux-only run reads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
