"""GGUF weights: mapped reading, exact fast dequantization, the chunked CPU path, the dequantized-layer cache,
and files replaced on disk under a loaded model."""

from __future__ import annotations

import os
import shutil

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from editkit.pipelines.core import gguf as core_gguf
from editkit.pipelines.core.errors import ModelFileError
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux.flow import text_ids, token_ids
from editkit.pipelines.flux.loading import (
    TRANSFORMER_CONFIG_DIR,
    transformer_config_from_state_dict,
    transformer_source,
)

F32 = torch.float32
QTYPES = ("Q8_0", "Q5_1", "Q4_0")


@pytest.fixture(scope="module")
def gguf_path(tiny_models):
    return tiny_models / "diffusion_models" / "flux1-fill-dev-Q8_0.gguf"


def _forward(component, tokens=16, seed=0):
    """One transformer call on fixed random inputs (``tokens`` image tokens, 7 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    config = component.module.config
    side = int(tokens ** 0.5) * 2
    with torch.inference_mode():
        return component.module(
            hidden_states=torch.randn(1, tokens, config.in_channels, generator=g), timestep=torch.tensor([0.6]),
            guidance=torch.tensor([30.0]), pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
            encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim, generator=g), txt_ids=text_ids(7),
            img_ids=token_ids(side, side), return_dict=False,
        )[0]


def _packed(qtype: str, rows: int, cols: int, seed: int = 0):
    array = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    packed = gguf.quants.quantize(array, kind)
    return kind, packed, torch.from_numpy(gguf.quants.dequantize(packed, kind))


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantization_is_exact_in_fp32_and_rounds_once_to_half(qtype):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    kind, packed, reference = _packed(qtype, 96, 256)
    weight = GGUFParameter(torch.from_numpy(packed), quant_type=kind)
    assert torch.equal(core_gguf.dequantize_parameter(weight, F32), reference)  # gguf-py's own decoder, bit for bit
    assert torch.equal(core_gguf.dequantize_parameter(weight, torch.bfloat16), reference.to(torch.bfloat16))


# Byte offsets of each block type's fp16 fields (scales, minimums): set to finite values, the rest random.
HALF_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}


def _random_blocks(qtype: str, rows: int, blocks_per_row: int, seed: int = 0):
    """Random packed rows of ``qtype`` (every bit pattern of the quantized values, fp16 fields finite),
    and gguf-py's reference dequantization of them (fp32)."""
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (rows, blocks_per_row, size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        packed[..., offset:offset + 2] = (rng.standard_normal((rows, blocks_per_row, 1)) * 0.01).astype(
            np.float16).view(np.uint8)
    packed = packed.reshape(rows, -1)
    return kind, packed, torch.from_numpy(gguf.quants.dequantize(packed, kind)), block


@pytest.mark.parametrize("qtype", list(HALF_FIELDS))
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16])
def test_every_decoder_equals_gguf_py_reference_rounded_once(qtype, dtype, monkeypatch):
    """EditKit's decoders against the library's reference, bit for bit, across chunk boundaries (a chunk of
    3 blocks forced, the last one partial) and in one chunk."""
    kind, packed, reference, block = _random_blocks(qtype, 37, 5, seed=len(qtype))
    shape = (37, 5 * block)
    assert torch.equal(core_gguf.dequantize(torch.from_numpy(packed), kind, shape, dtype), reference.to(dtype))
    monkeypatch.setattr(core_gguf, "_DECODE_CHUNK_ELEMENTS", 3 * block)
    out = torch.full(shape, float("nan"), dtype=dtype)
    got = core_gguf.dequantize(torch.from_numpy(packed), kind, shape, dtype, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, reference.to(dtype))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q4_0", "Q4_K"])
def test_decoding_to_bf16_makes_no_fp32_copy_of_the_weight(qtype):
    """On a CPU the weight is decoded a cache-sized chunk at a time: no temporary anywhere near the fp32
    size of the weight exists (the former decoders built the whole weight in fp32, then converted)."""
    from torch.profiler import ProfilerActivity, profile

    kind, packed, reference, block = _random_blocks(qtype, 512, 4096 // gguf.GGML_QUANT_SIZES[
        getattr(gguf.GGMLQuantizationType, qtype)][0])
    out = torch.empty(512, 4096, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        core_gguf.dequantize(torch.from_numpy(packed), kind, (512, 4096), torch.bfloat16, out=out)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest <= 4 * core_gguf._DECODE_CHUNK_ELEMENTS < 512 * 4096 * 4 // 4
    assert torch.equal(out, reference.to(torch.bfloat16))


def test_uncached_layers_share_one_reused_buffer_and_stay_exact():
    """Layers that are not cached decode into one reused CPU buffer; each call still gives its own layer's
    F.linear (a later layer's decode does not change an earlier result)."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    layers, references = [], []
    for seed, (rows, cols) in enumerate([(96, 256), (160, 512), (64, 256)]):
        kind, packed, reference = _packed("Q4_0", rows, cols, seed=seed)
        layer = core_gguf.GGUFLinear(cols, rows, bias=False, compute_dtype=F32)
        layer.weight = GGUFParameter(torch.from_numpy(packed), quant_type=kind)
        layers.append(layer)
        references.append(reference)
    x = [torch.randn(200, layer.in_features) for layer in layers]  # 200 rows: the full-decode path
    with torch.inference_mode():
        outputs = [layer(v) for layer, v in zip(layers, x)]
    for out, v, reference in zip(outputs, x, references):
        torch.testing.assert_close(out, F.linear(v, reference), rtol=1e-5, atol=1e-5)
    buffer = core_gguf._scratch(1, F32)
    assert buffer.untyped_storage().nbytes() >= 160 * 512 * 4  # grown to the largest weight, then reused


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 3, 300])
def test_cpu_chunked_layer_equals_dense_linear(qtype, rows, monkeypatch):
    """The chunked CPU path (several chunks forced) gives F.linear with the dequantized weight."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    monkeypatch.setattr(core_gguf, "_CHUNK_ELEMENTS", 64 * 256)  # 4 chunks of 64 rows, the last one partial
    kind, packed, reference = _packed(qtype, 250, 256, seed=rows)
    layer = core_gguf.GGUFLinear(256, 250, bias=True, compute_dtype=F32)
    layer.weight = GGUFParameter(torch.from_numpy(packed), quant_type=kind)
    layer.bias = torch.nn.Parameter(torch.randn(250), requires_grad=False)
    x = torch.randn(2, rows, 256)
    expected = F.linear(x, reference, layer.bias)
    got = layer(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    layer.bias = None
    torch.testing.assert_close(layer(x), F.linear(x, reference), rtol=1e-5, atol=1e-4)


def test_mapped_read_equals_diffusers_copied_read_and_never_writes_the_file(gguf_path, tmp_path):
    from editkit.pipelines.core.diffusers_compat import load_gguf_checkpoint

    path = tmp_path / "copy.gguf"
    shutil.copyfile(gguf_path, path)
    before = path.read_bytes()
    copied = load_gguf_checkpoint(str(path))
    mapped = core_gguf.read_gguf(path)
    assert list(mapped) == list(copied)
    for key, tensor in copied.items():
        assert type(mapped[key]) is type(tensor) and getattr(mapped[key], "quant_type", None) == getattr(
            tensor, "quant_type", None), key
        assert torch.equal(torch.Tensor.as_subclass(mapped[key], torch.Tensor),
                           torch.Tensor.as_subclass(tensor, torch.Tensor)), key
    weight = next(t for t in mapped.values() if hasattr(t, "quant_type"))
    torch.Tensor.as_subclass(weight, torch.Tensor).zero_()  # private copy-on-write mapping: the file keeps its bytes
    assert path.read_bytes() == before
    assert not torch.equal(torch.Tensor.as_subclass(core_gguf.read_gguf(path)[_first_quantized(mapped)],
                                                    torch.Tensor), torch.zeros_like(weight, dtype=torch.uint8))


def _first_quantized(sd):
    return next(k for k, t in sd.items() if hasattr(t, "quant_type"))


def _todays_copied_model(path):
    """The transformer as EditKit loaded it before mapping: diffusers' copied read and diffusers' GGUF layers."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    from editkit.pipelines.core.diffusers_compat import load_gguf_checkpoint
    from editkit.pipelines.flux import layout

    sd = layout.bfl_transformer_to_diffusers(load_gguf_checkpoint(str(path)))
    model = FluxTransformer2DModel.from_single_file(
        sd, config=str(TRANSFORMER_CONFIG_DIR), torch_dtype=F32, local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=F32), **transformer_config_from_state_dict(sd))
    return model.eval()


@pytest.mark.parametrize("qtype", QTYPES)
def test_mapped_load_gives_todays_copied_load_outputs(tiny_models, tmp_path, qtype):
    """Same outputs as the copied load, up to diffusers' float16 rounding of dequantized weights (which
    EditKit's exact fp32 dequantization does not have); the quantized bytes stay quantized and mapped."""
    from diffusers.quantizers.gguf.utils import GGUFLinear as DiffusersGGUFLinear

    from tiny.core import write_gguf

    path = tmp_path / f"fill-{qtype}.gguf"
    write_gguf(load_file(str(tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors")), path, qtype)
    mapped = transformer_source(None, path, F32).get()
    layers = [m for m in mapped.module.modules() if isinstance(m, DiffusersGGUFLinear)]
    assert layers and all(type(m) is core_gguf.GGUFLinear for m in layers)
    assert all(m.weight.dtype == torch.uint8 for m in layers)
    today = _todays_copied_model(path)
    got, expected = _forward(mapped), _forward(type("C", (), {"module": today})())
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 2e-3 * scale
    # and exactly what the reference dequantization of every layer gives
    dense = transformer_source(None, path, F32).derived("dense", lambda c: c, "dense copy").get()
    for layer in [m for m in dense.module.modules() if isinstance(m, core_gguf.GGUFLinear)]:
        kind, packed = layer.weight.quant_type, torch.Tensor.as_subclass(layer.weight, torch.Tensor).numpy()
        layer._dense = torch.from_numpy(gguf.quants.dequantize(packed, kind)).reshape(layer.out_features, -1)
    torch.testing.assert_close(_forward(dense), got, rtol=1e-5, atol=1e-5)


def test_dequant_cache_fills_within_budget_and_clearing_keeps_results(gguf_path):
    component = transformer_source(None, gguf_path, F32).derived("cache", lambda c: c, "cache test").get()
    cache = component.extras["dequant_cache"]
    expected = _forward(component)
    assert cache.layers == 0  # the plain-torch runtime has not lent memory yet
    runtime = TorchRuntime("cpu")
    runtime.acquire(component)
    assert cache.budget > 0
    first = _forward(component)
    assert cache.layers > 0 and 0 < cache.used <= cache.budget
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_forward(component), expected, rtol=1e-5, atol=1e-5)  # served from the cache
    component.drop_caches()
    assert cache.layers == 0 and cache.used == 0
    assert all(m._dense is None for m in component.module.modules() if isinstance(m, core_gguf.GGUFLinear))
    torch.testing.assert_close(_forward(component), expected, rtol=1e-5, atol=1e-5)
    cache.clear()
    cache.set_budget(0)
    _forward(component)
    assert cache.layers == 0  # no budget, nothing kept
    cache.set_budget(1 << 30)
    _forward(component, tokens=4)
    assert cache.layers == 0  # 4 activation rows: the chunked path is cheaper than a cached weight


@pytest.mark.parametrize("setting, free, budget", [("auto", 100 << 20, 50 << 20), ("off", 100 << 20, 0),
                                                   ("10", 100 << 20, 10 << 20), ("500", 100 << 20, 100 << 20)])
def test_cache_budget_setting(monkeypatch, setting, free, budget):
    monkeypatch.setenv("EDITKIT_GGUF_CACHE", setting)
    assert core_gguf.cache_budget_from_env(free) == budget


def test_file_replaced_by_a_new_one_keeps_the_loaded_model(gguf_path, tiny_models, tmp_path):
    from tiny.core import write_gguf

    path = tmp_path / "fill.gguf"
    shutil.copyfile(gguf_path, path)
    loaded = transformer_source(None, path, F32).get()
    before = _forward(loaded)
    other = load_file(str(tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors"))
    write_gguf({k: v * 0.5 for k, v in other.items()}, tmp_path / "new.gguf")
    os.replace(tmp_path / "new.gguf", path)  # what download tools and `mv` do: a new file under the old name
    TorchRuntime("cpu").acquire(loaded)  # no error: the mapping still holds the old file
    assert torch.equal(_forward(loaded), before)
    reloaded = transformer_source(None, path, F32).get()  # new size/mtime: the next run loads the new file
    assert reloaded is not loaded and not torch.allclose(_forward(reloaded), before)


def test_file_overwritten_in_place_is_refused_with_advice(gguf_path, tmp_path):
    path = tmp_path / "fill.gguf"
    shutil.copyfile(gguf_path, path)
    loaded = transformer_source(None, path, F32).get()
    data = bytearray(path.read_bytes())
    with open(path, "r+b") as handle:  # same inode, same size, new bytes at the end
        handle.seek(len(data) - 64)
        handle.write(bytes(64))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ModelFileError, match="overwritten on disk.*run the workflow again"):
        TorchRuntime("cpu").acquire(loaded)


@pytest.mark.parametrize("rows", [3, 300])  # the chunked few-row path, and a whole-weight decode then one matmul
def test_cpu_decoding_runs_on_one_thread_and_restores_the_thread_count(rows, monkeypatch):
    """Decoding (and the few-row chunked path) runs on DECODE_THREADS threads, the matmul of a many-row call on all
    of them, the thread count is restored afterwards, and the output is the same bit for bit as decoding on all."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    kind, packed, reference = _packed("Q8_0", 250, 256, seed=rows)
    layer = core_gguf.GGUFLinear(256, 250, bias=False, compute_dtype=F32)
    layer.weight = GGUFParameter(torch.from_numpy(packed), quant_type=kind)
    x = torch.randn(rows, 256)
    seen = []
    decoder = core_gguf._DECODERS[int(kind)]
    monkeypatch.setitem(core_gguf._DECODERS, int(kind),
                        lambda blocks, work: (seen.append(torch.get_num_threads()), decoder(blocks, work))[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one = layer(x)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        monkeypatch.setattr(core_gguf, "DECODE_THREADS", 0)
        seen.clear()
        every = layer(x)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, every)
    torch.testing.assert_close(one, F.linear(x, reference), rtol=1e-5, atol=1e-4)
