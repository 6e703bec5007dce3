"""``auto`` keeps a bf16 file in bf16 where the device computes in fp32 (issue 17: storage keeps the file's
precision), cast per layer to the same fp32 arithmetic as a widened copy: the results are the same bits."""

from __future__ import annotations

import torch

from editkit.nodes import zimage_nodes as zn
from editkit.nodes.common import model_precision
from editkit.pipelines.core.loading import stored_float_dtype
from editkit.pipelines.core.precision import CastLinear, Precision
from node_calls import call_node
from tiny import zimage as zm

PROMPT = "portrait of a sailor, golden hour"


def _load(weight_dtype):
    return call_node(zn.EditKitZImageLoader, diffusers_folder=zm.FOLDER, transformer_file=zm.TRANSFORMER_FILE,
                     text_encoder_file=zm.TEXT_ENCODER_FILE, vae_file="ae.safetensors", weight_dtype=weight_dtype)


def _sample(loaded):
    model, text, vae = loaded
    positive, _ = call_node(zn.EditKitZImageTextEncode, text_encoder=text, prompt=PROMPT)
    latent, _ = call_node(zn.EditKitZImageSampler, model=model, vae=vae, positive=positive, width=64, height=64,
                          seed=3, steps=2, cfg=1.0, sampler="euler", shift=3.0, denoise=1.0,
                          denoise_convention="denoise", batch_size=1, decode=False)
    return latent["samples"]


def test_file_dtype_is_read_from_the_header(tiny_models):
    root = tiny_models / "diffusion_models"
    assert stored_float_dtype(root / zm.TRANSFORMER_FILE) == torch.bfloat16
    assert stored_float_dtype(root / "flux1-fill-dev-Q8_0.gguf") is None  # quantized: stays as it is anyway
    assert stored_float_dtype(tiny_models / "diffusers" / zm.FOLDER / "transformer") in (torch.bfloat16, torch.float32)
    assert stored_float_dtype(None) is None


def test_auto_on_a_cpu_stores_a_bf16_file_in_bf16_and_computes_in_fp32(models_root, torch_runtime):
    file = models_root / "diffusion_models" / zm.TRANSFORMER_FILE
    assert model_precision("diffusion", None, file) == Precision(torch.bfloat16, torch.float32)
    assert model_precision("diffusion", torch.float32, file) == Precision(torch.float32, torch.float32)

    auto = _load("auto")
    module = auto[0].transformer.get().module
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    stored = {m.weight.dtype for name, m in module.named_modules() if isinstance(m, CastLinear)
              and not name.startswith("t_embedder.")}
    assert stored == {torch.bfloat16} and all(m.compute_dtype == torch.float32 for m in linears
                                                if isinstance(m, CastLinear))
    # the timestep embedder picks its activations' dtype from its weight: kept in fp32
    assert module.t_embedder.mlp[0].weight.dtype == torch.float32
    widened = _load("fp32")
    assert widened[0].transformer.get().module.layers[0].attention.to_q.weight.dtype == torch.float32
    torch.testing.assert_close(_sample(auto), _sample(widened), rtol=0, atol=0)


def test_cast_weights_are_kept_while_memory_is_lent_and_give_the_same_bits(models_root, torch_runtime, monkeypatch):
    """A bf16-stored transformer on a CPU keeps its cast fp32 weights in the lent cache: later calls skip the
    cast and compute the same bits; dropping the caches frees them, and the text encoder gets no cache."""
    from editkit.pipelines.core import precision

    casts = []
    real = precision.cast_weight_bias
    monkeypatch.setattr(precision, "cast_weight_bias", lambda *a: casts.append(a[0]) or real(*a))
    loaded = _load("auto")
    first = _sample(loaded)
    component = loaded[0].transformer.get()
    cache = component.extras["dequant_cache"]
    layers = [m for m in component.module.modules() if isinstance(m, CastLinear)]
    kept = [m for m in layers if m._dense is not None]
    assert kept and len(kept) == cache.layers and cache.used == sum(m.weight.numel() * 4 for m in kept)
    first_casts = len(casts)
    casts.clear()
    second = _sample(loaded)
    assert not set(map(id, casts)) & set(map(id, kept)), "a kept layer was cast again"
    assert len(casts) < first_casts
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    component.drop_caches()
    assert cache.used == 0 and all(m._dense is None for m in layers)
    encoder = loaded[1].get().encoder
    assert encoder.kind == "text_encoder" and "dequant_cache" not in encoder.extras


def test_no_cast_weights_are_kept_when_the_cache_is_off(models_root, torch_runtime, monkeypatch):
    monkeypatch.setenv("EDITKIT_GGUF_CACHE", "off")
    loaded = _load("auto")
    _sample(loaded)
    component = loaded[0].transformer.get()
    assert component.extras["dequant_cache"].used == 0
    assert all(m._dense is None for m in component.module.modules() if isinstance(m, CastLinear))


def test_cast_weights_of_many_row_products_are_not_kept(models_root, torch_runtime, monkeypatch):
    """From CAST_CACHE_MAX_ROWS rows on the cast is a small part of the product: no memory is spent on it."""
    from editkit.pipelines.core import precision

    monkeypatch.setattr(precision, "CAST_CACHE_MAX_ROWS", 1)
    loaded = _load("auto")
    _sample(loaded)
    assert loaded[0].transformer.get().extras["dequant_cache"].used == 0
