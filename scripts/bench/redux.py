"""FLUX.1 Redux: the prior's time per picture, the sampler's time per step with 729 and 81 picture tokens,
and the peak memory of a Redux-only run against one that also loads and runs T5 + CLIP.

``prior``   SigLIP + Redux embedder, batch of 4 pictures: the tests' tiny prior and a real-width one
            (SigLIP so400m's real layer, 1 of its 27 layers, and the real 64 M-parameter embedder); the full
            prior is estimated as embedder + 27 x one SigLIP layer.
``steps``   EditKit · Flux Sampler on the FLUX.1-dev transformer at ``--flux-depth`` with 512 zero T5 tokens +
            729 (downsampling 1) or 81 (downsampling 3) Redux tokens, alternating.
``memory``  Fresh process each, bf16, real-width models with 1 block each (T5-XXL's width with 1 of 24 blocks and
            its 32128-token embedding, CLIP-L with 1 of 12 layers).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from . import models, procs
from .harness import Settings, StepClock, alternate, pack_module, print_table, timing_table

PARTS = ("prior", "steps", "memory")
REAL_SIGLIP_LAYER = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16,
                         image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SHALLOW_T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                  relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                  is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
SHALLOW_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def _prior(siglip: dict, width: int, dtype: torch.dtype):
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from tiny.redux import tiny_processor

    loading = pack_module("pipelines.flux.redux.loading")
    torch.manual_seed(0)
    encoder = SiglipVisionModel(SiglipVisionConfig(**siglip)).to(dtype).eval()
    embedder = ReduxImageEncoder(redux_dim=siglip["hidden_size"], txt_in_features=width).to(dtype).eval()
    return loading.ReduxPrior(models.component(encoder, "siglip", dtype, "text_encoder"),
                              models.component(embedder, "redux", dtype, "text_encoder"),
                              tiny_processor(siglip["image_size"]))


def _prior_cases(prior, pictures, settings: Settings) -> dict:
    preprocess = pack_module("pipelines.flux.redux.preprocess")
    values = preprocess.pixel_values(pictures, prior.processor)
    hidden = {}

    def siglip_case():
        with torch.inference_mode():
            hidden["h"] = prior.encoder.module(pixel_values=values.to(settings.device, prior.encoder.dtype))

    def embedder_case():
        with torch.inference_mode():
            prior.embedder.module(hidden["h"].last_hidden_state).image_embeds.float().cpu()

    def preprocess_case():
        preprocess.pixel_values(pictures, prior.processor)

    return {"SigLIP (4 pictures)": siglip_case, "embedder (4 pictures)": embedder_case,
            "preprocess (4 pictures)": preprocess_case}


def prior_part(settings: Settings) -> None:
    from tiny.redux import TINY_SIGLIP

    preprocess = pack_module("pipelines.flux.redux.preprocess")
    pictures = [preprocess.to_pil(torch.rand(3, 480, 640)) for _ in range(4)]
    for label, siglip, width in (("tiny SigLIP + tiny embedder", TINY_SIGLIP, 32),
                                 ("real width: 1 SigLIP layer + real embedder", REAL_SIGLIP_LAYER, 4096)):
        cases = _prior_cases(_prior(siglip, width, settings.dtype), pictures, settings)
        timings = alternate(cases, settings.rounds, device=settings.device)
        timing_table(f"Redux prior, {label}, {settings.describe()}", timings, unit="s per batch of 4")
        if siglip is REAL_SIGLIP_LAYER:
            estimate = sum(t.median for t in timings.values()) + 26 * timings["SigLIP (4 pictures)"].median
            print(f"\nfull real prior ≈ preprocess + 27 x SigLIP layer + embedder = {estimate / 4:.3f} s per picture")


def steps_part(settings: Settings) -> None:
    generate = pack_module("pipelines.flux.generate")
    conditioning = pack_module("pipelines.flux.conditioning")
    runtime_mod = pack_module("pipelines.core.runtime")
    scheduler = pack_module("pipelines.flux.family").FAMILY.scheduler_config(None)
    module = models.flux_transformer("dev", settings.flux_depth, settings.dtype, settings.device)
    component = models.component(module, "bench-redux", settings.dtype)
    vae = models.component(models.flux_vae(settings.dtype, settings.device, real=False), "tiny-vae", settings.dtype,
                           "vae")

    def case(tokens):
        g = torch.Generator().manual_seed(0)
        states = torch.cat([torch.zeros(1, 512, 4096), torch.randn(1, tokens, 4096, generator=g)], dim=1)
        text = conditioning.FluxText(states, torch.zeros(1, 768), None)

        def run():
            clock = StepClock(settings.device)
            runtime = runtime_mod.TorchRuntime(settings.device, on_progress=clock.tick)
            clock.start()
            generate.generate(component, vae, text, width=settings.size, height=settings.size,
                              settings=generate.GenerateSettings(steps=settings.steps + 1, guidance=2.5, seed=42),
                              scheduler_config=scheduler, runtime=runtime)
            return clock.per_step()

        return run

    d, s = settings.flux_depth
    timing_table(f"Flux Sampler with Redux tokens after 512 zero T5 tokens, FLUX.1-dev {d}+{s} blocks, "
                 f"{settings.describe()}", alternate({"81 Redux tokens (downsampling 3)": case(81),
                                                      "729 Redux tokens (downsampling 1)": case(729)},
                                                     settings.rounds, device=settings.device))


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

    from tiny.core import save

    layout = pack_module("pipelines.flux.layout")
    files = {"transformer": folder / "diffusion_models" / "dev.safetensors",
             "siglip": folder / "clip_vision" / "siglip-1layer.safetensors",
             "redux": folder / "style_models" / "flux1-redux-dev.safetensors",
             "clip": folder / "text_encoders" / "clip-l-1layer.safetensors",
             "t5": folder / "text_encoders" / "t5xxl-1block.safetensors"}
    torch.manual_seed(0)
    save(layout.diffusers_transformer_to_bfl(models.flux_transformer("dev", (1, 1), torch.bfloat16).state_dict()),
         files["transformer"], torch.bfloat16)
    siglip = SiglipVisionModel(SiglipVisionConfig(**REAL_SIGLIP_LAYER)).state_dict()
    save({f"vision_model.{k}": v for k, v in siglip.items()}, files["siglip"], torch.bfloat16)
    save(ReduxImageEncoder().state_dict(), files["redux"], torch.bfloat16)
    clip = CLIPTextModel(CLIPTextConfig(**SHALLOW_CLIP)).state_dict()
    save({f"text_model.{k}" if not k.startswith("text_model.") else k: v for k, v in clip.items()
          if not k.endswith("position_ids")}, files["clip"], torch.bfloat16)
    t5 = T5EncoderModel(T5Config(**SHALLOW_T5)).state_dict()
    save({k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"}, files["t5"], torch.bfloat16)
    return files


def memory_job(options: dict) -> dict:
    """Child process: one Redux variation through EditKit's loaders, with or without text encoders."""
    files = {k: Path(v) for k, v in options["files"].items()}
    flux_loading = pack_module("pipelines.flux.loading")
    scheduler = pack_module("pipelines.flux.family").FAMILY.scheduler_config(None)
    redux_loading = pack_module("pipelines.flux.redux.loading")
    prior_mod = pack_module("pipelines.flux.redux.prior")
    generate = pack_module("pipelines.flux.generate")
    conditioning = pack_module("pipelines.flux.conditioning")
    text_mod = pack_module("pipelines.flux.text")
    runtime = pack_module("pipelines.core.runtime").TorchRuntime("cpu")
    import diffusers  # noqa: F401  (imported before the baseline)
    import transformers  # noqa: F401

    dtype = torch.bfloat16
    baseline = procs.status_bytes("VmRSS")
    transformer = flux_loading.transformer_source(None, files["transformer"], dtype).get()
    vae = flux_loading.vae_source(Path(options["fill_folder"]), None, torch.float32).get()
    prior = redux_loading.ReduxModel(None, files["siglip"], files["redux"], dtype).prior.get()
    tokens = prior_mod.encode(prior, torch.rand(1, 3, 480, 640), prior_mod.ReduxSettings(), runtime).tokens
    if options["text"]:
        encoders = text_mod.text_encoder_source(Path(options["fill_folder"]), files["clip"], files["t5"], dtype)
        states, pooled = encoders.get().encode(["a watercolor painting"], runtime, 512)
    else:
        states, pooled = prior_mod.zero_text(4096, 768)
    text = conditioning.read_conditioning(
        prior_mod.append_to_conditioning(conditioning.make_conditioning(states, pooled), tokens))
    generate.generate(transformer, vae, text, width=128, height=128,
                      settings=generate.GenerateSettings(steps=1, guidance=2.5, seed=42),
                      scheduler_config=scheduler, runtime=runtime)
    return {"peak_rss_bytes": procs.status_bytes("VmHWM") - baseline, "tokens": int(text.states.shape[1])}


def memory_part(settings: Settings) -> None:
    from tiny import make_tree

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        make_tree(scratch / "models")
        files = write_memory_files(scratch / "bench")
        for label, text in (("Redux only (no text encoder)", False), ("Redux + T5 + CLIP", True)):
            row = procs.child("redux:memory_job", {"files": {k: str(v) for k, v in files.items()}, "text": text,
                                                   "fill_folder": str(scratch / "models/diffusers/FLUX.1-Fill-dev")})
            rows.append([label, row["peak_rss_bytes"] / 2**20, row["tokens"]])
        text_mib = (files["clip"].stat().st_size + files["t5"].stat().st_size) / 2**20
    print_table(f"Peak RSS of one Redux variation (fresh process each, bf16, 1-block real-width models; the text "
                f"encoder files weigh {text_mib:.0f} MiB, the real T5-XXL + CLIP-L ~9.8 GB)",
                ["run", "peak RSS MiB", "conditioning tokens"], rows)


def run(settings: Settings, parts=PARTS) -> None:
    for part in parts:
        {"prior": prior_part, "steps": steps_part, "memory": memory_part}[part](settings)
