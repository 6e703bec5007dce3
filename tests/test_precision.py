"""Storage dtype vs compute dtype: the rules, the layers that cast per call, and the slow-choice warning."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from editkit.pipelines.core import precision as P
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux.flow import text_ids, token_ids
from editkit.pipelines.flux.loading import transformer_source
from editkit.pipelines.flux.text import text_encoder_source

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(scope="module")
def folder(tiny_models):
    return tiny_models / "diffusers" / "FLUX.1-Fill-dev"


def _forward(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = module.config
    with torch.inference_mode():
        return module(
            hidden_states=torch.randn(1, 16, config.in_channels, generator=g), timestep=torch.tensor([0.6]),
            guidance=torch.tensor([30.0]), pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
            encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim, generator=g), txt_ids=text_ids(7),
            img_ids=token_ids(8, 8), return_dict=False,
        )[0]


def test_compute_dtype_rules(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(P, "cpu_fast_bf16", lambda: False)
    assert {P.compute_dtype_for(d, cpu) for d in (F32, BF16, F16, *P.FP8_TYPES)} == {F32}  # no bf16 units: fp32
    monkeypatch.setattr(P, "cpu_fast_bf16", lambda: True)  # AMX-BF16 / AVX512-BF16: bf16 only where asked for
    assert [P.compute_dtype_for(d, cpu) for d in (F32, BF16, F16)] == [F32, BF16, F32]
    assert P.auto_precision("text_encoder", cpu) == P.Precision(F32, F32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert [P.compute_dtype_for(d, gpu) for d in (F32, BF16, F16)] == [F32, BF16, F16]
    assert all(P.compute_dtype_for(d, gpu) == BF16 for d in P.FP8_TYPES)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert P.compute_dtype_for(BF16, gpu) == F16  # no bf16 units: cast per layer to fp16
    assert P.auto_precision("diffusion", cpu) == P.Precision(F32, F32)
    assert P.auto_precision("diffusion", gpu) == P.Precision(F16, F16)
    assert P.auto_precision("vae", gpu) == P.Precision(F32, F32)  # FLUX.1's VAE overflows in fp16


def test_bf16_storage_fp32_compute_equals_casting_bf16_weights_up_front(folder):
    stored = transformer_source(folder, None, F32, storage=BF16).get()
    assert stored.dtype == F32
    linears = [m for m in stored.module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is P.CastLinear and m.weight.dtype == BF16 for m in linears)
    assert all(p.dtype == F32 for n, p in stored.module.named_parameters() if not n.endswith(".weight")
               or not isinstance(stored.module.get_submodule(n.rsplit(".", 1)[0]), torch.nn.Linear))

    reference = transformer_source(folder, None, F32).derived("upfront", lambda c: c, "cast up front").get()
    for layer in reference.module.modules():
        if type(layer) in P.PLAIN_LINEARS:  # the same weights, rounded to bf16 and cast back once
            layer.weight.data = layer.weight.data.to(BF16).to(F32)
    assert P.storage_bytes(stored.module) < 0.6 * P.storage_bytes(reference.module)
    assert torch.equal(_forward(stored.module), _forward(reference.module))


def test_fp16_stored_text_encoders_compute_in_fp32(folder):
    """The tiny encoders' weights are fp16 values, so fp16 storage with fp32 compute is exactly the fp32 model."""
    dense = text_encoder_source(folder, None, None, F32).get()
    stored = text_encoder_source(folder, None, None, F32, storage=F16).get()
    t5_linears = {n: m for n, m in stored.t5.module.named_modules() if isinstance(m, torch.nn.Linear)}
    # T5's feed-forward output layers stay in the compute dtype (transformers' _keep_in_fp32_modules):
    # transformers casts their input to their weight's dtype
    assert {n for n, m in t5_linears.items() if m.weight.dtype == F32} == {n for n in t5_linears if n.endswith(".wo")}
    assert sum(m.weight.dtype == F16 for m in t5_linears.values()) > len(t5_linears) / 2
    runtime = TorchRuntime("cpu")
    states, pooled = stored.encode(["a red fox"], runtime, max_sequence_length=64)
    ref_states, ref_pooled = dense.encode(["a red fox"], runtime, max_sequence_length=64)
    assert states.dtype == F32
    assert torch.equal(states, ref_states) and torch.equal(pooled, ref_pooled)


def test_slow_explicit_choice_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(P, "_WARNED", set())
    monkeypatch.setattr(P, "cpu_fast_bf16", lambda: False)  # a CPU without bf16 instructions
    auto = P.Precision(F32, F32)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="EditKit"):
        assert P.resolve(None, auto, cpu) == auto
        assert P.resolve(F32, auto, cpu) == auto
        assert not caplog.records
        for _ in range(3):
            assert P.resolve(BF16, auto, cpu) == P.Precision(BF16, F32)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "\n" not in warnings[0]
    assert "bf16 on this CPU" in warnings[0] and "fp32" in warnings[0] and "pick fp32 or auto" in warnings[0]
    monkeypatch.setattr(P, "cpu_fast_bf16", lambda: True)
    monkeypatch.setattr(P, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="EditKit"):
        assert P.resolve(BF16, auto, cpu) == P.Precision(BF16, BF16)
    assert len(caplog.records) == 1  # fast bf16 on this CPU: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="EditKit"):
        P.resolve(F16, auto, cpu)  # another choice: its own single warning
    assert len(caplog.records) == 2 and "fp16 on this CPU" in caplog.records[-1].getMessage()


# --------------------------------------------------------------------------------------------------------------
# fp8 files stay fp8 in memory (issue 17, fault 3)


def _qwen_forward(module):
    g = torch.Generator().manual_seed(0)
    c = module.config
    with torch.inference_mode():
        return module(hidden_states=torch.randn(1, 32, c.in_channels, generator=g), timestep=torch.tensor([0.5]),
                      encoder_hidden_states=torch.randn(1, 7, c.joint_attention_dim, generator=g),
                      encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long),
                      img_shapes=[[(1, 4, 4), (1, 4, 4)]], return_dict=False)[0]


def _fp8_variants(sd: dict, tmp_path):
    """The same weights as e4m3fn, e5m2 and ComfyUI's scaled e4m3fn files, plus for each the weights cast up
    front (the reference: what the old loader held in memory)."""
    from fp8_files import write_fp8_variants

    return write_fp8_variants(sd, tmp_path, "qwen")


def _zimage_forward(module):
    g = torch.Generator().manual_seed(0)
    c = module.config
    with torch.inference_mode():
        out = module([torch.randn(c.in_channels, 1, 8, 8, generator=g)], torch.tensor([0.5]),
                     [torch.randn(7, c.cap_feat_dim, generator=g)], return_dict=False)[0]
    return torch.stack(out)


def _fp8_family(family):
    from editkit.pipelines.qwen_image import loading as qwen_loading
    from editkit.pipelines.zimage import loading as zimage_loading
    from tiny.qwen_image import FILES
    from tiny.zimage import TRANSFORMER_FILE

    if family == "qwen":
        return FILES["bf16"], qwen_loading.transformer_source, _qwen_forward
    return TRANSFORMER_FILE, zimage_loading.transformer_source, _zimage_forward


@pytest.mark.parametrize("family", ["qwen", "zimage"])
@pytest.mark.parametrize("variant", ["e4m3fn", "e5m2", "scaled"])
def test_fp8_files_stay_fp8_and_equal_casting_up_front(family, variant, tiny_models, tmp_path):
    import safetensors.torch

    name, source, forward = _fp8_family(family)
    sd = safetensors.torch.load_file(str(tiny_models / "diffusion_models" / name))
    path, reference_path = _fp8_variants(sd, tmp_path)[variant]
    fp8 = {"e5m2": torch.float8_e5m2}.get(variant, torch.float8_e4m3fn)
    component = source(None, path, F32).get()
    linears = {n: m for n, m in component.module.named_modules() if isinstance(m, torch.nn.Linear)}
    stored = {n for n, m in linears.items() if m.weight.dtype == fp8}
    assert stored and all(isinstance(linears[n], P.CastLinear) for n in stored)
    # every fp8 weight stays fp8 except Z-Image's timestep embedder (diffusers casts activations to its dtype)
    fp8_bytes = sum(v.numel() for k, v in safetensors.torch.load_file(str(path)).items()
                    if v.dtype == fp8 and "t_embedder." not in k)
    assert sum(m.weight.numel() for n, m in linears.items() if n in stored) == fp8_bytes, \
        "an fp8 weight was widened in memory"
    reference = source(None, reference_path, F32).get()
    assert all(p.dtype == F32 for p in reference.module.parameters())
    torch.testing.assert_close(forward(component.module), forward(reference.module), rtol=1e-5, atol=1e-5)


def test_bf16_file_stays_bf16_with_fp32_compute(tiny_models):
    from editkit.pipelines.qwen_image import loading as qwen_loading
    from tiny.qwen_image import FILES

    component = qwen_loading.transformer_source(None, tiny_models / "diffusion_models" / FILES["bf16"], F32, BF16).get()
    linears = [m for m in component.module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, P.CastLinear) and m.weight.dtype == BF16 and m.compute_dtype == F32
                           for m in linears)
    assert _qwen_forward(component.module).dtype == F32


@pytest.mark.parametrize("family", ["flux", "fill", "qwen", "layered", "flux2", "zimage"])
@pytest.mark.parametrize("variant", ["e4m3fn", "e5m2", "scaled"])
def test_every_familys_fp8_file_stays_fp8_and_equals_casting_up_front(family, variant, tmp_path):
    """FLUX.1 (BFL keys: the scales follow the fused qkv/linear1 splits), Fill, Qwen-Image-Edit, Qwen-Image-Layered
    (its RGB/RGBA embedding is an nn.Embedding: widened, not kept), FLUX.2 and Z-Image read through the shared
    reader: Linear weights stay fp8 in memory and the output is the up-front cast model's."""
    from fp8_files import FP8, forward, source, write_fp8_files

    path, reference_path = write_fp8_files(family, tmp_path)[variant]
    fp8 = FP8[variant][0]
    component = source(family)(None, path, F32).get()
    # every Linear keeps fp8 but Z-Image's timestep embedder (diffusers casts activations to its weight's dtype)
    linears = [m for n, m in component.module.named_modules() if isinstance(m, torch.nn.Linear)
               and not (family == "zimage" and n.startswith("t_embedder."))]
    assert linears and all(type(m) is P.CastLinear and m.weight.dtype == fp8 for m in linears), \
        "an fp8 Linear weight was widened in memory"
    assert {p.dtype for p in component.module.parameters() if p.dtype != fp8} == {F32}
    assert sum(p.numel() for p in component.module.parameters() if p.dtype == fp8) == \
        sum(m.weight.numel() for m in linears)
    reference = source(family)(None, reference_path, F32).get()
    assert all(p.dtype == F32 for p in reference.module.parameters())
    assert P.storage_bytes(component.module) < 0.6 * P.storage_bytes(reference.module)  # fp32 would be 1.0
    torch.testing.assert_close(forward(family, component.module), forward(family, reference.module),
                               rtol=1e-5, atol=1e-5)


def _fp8_layer(bias: bool) -> P.CastLinear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 128, bias=bias)
    layer.weight.data = (layer.weight.data / 2.0 ** -6).to(torch.float8_e4m3fn)
    P.keep_fp8_layers(layer, {"weight": 2.0 ** -6}, F32)
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_matmul_is_opt_in_and_within_its_error_bound(monkeypatch, bias):
    """EDITKIT_FP8_MATMUL=1 (or ComfyUI's --fast through set_fp8_matmul) multiplies fp8 weights in fp8; its error
    against the per-layer cast is the input's fp8 rounding: relative L2 below 4 % (measured 2.7 % here)."""
    layer = _fp8_layer(bias)
    assert layer.weight_scale == 2.0 ** -6
    x = torch.randn(4, 33, 256, generator=torch.Generator().manual_seed(1))
    monkeypatch.delenv("EDITKIT_FP8_MATMUL", raising=False)
    P.set_fp8_matmul(None)
    cast = layer(x)
    expected = F.linear(x, layer.weight.float() * layer.weight_scale, layer.bias)
    assert torch.equal(cast, expected)  # off by default: the per-layer cast
    if P.fp8_linear(layer, x) is None:
        pytest.skip("torch._scaled_mm does not run on this device (fp8 matmul falls back to the cast)")
    monkeypatch.setenv("EDITKIT_FP8_MATMUL", "1")
    try:
        fast = layer(x)
        error = ((fast - cast).norm() / cast.norm()).item()
        assert fast.shape == cast.shape and fast.dtype == F32
        assert 0 < error < 0.04, error
        P.set_fp8_matmul(False)  # the bridge's choice wins over the environment
        assert torch.equal(layer(x), cast)
        assert P.fp8_linear(layer, x[..., :250]) is None  # _scaled_mm needs multiples of 16: cast instead
    finally:
        P.set_fp8_matmul(None)


@pytest.mark.parametrize("family", ["flux", "zimage", "flux2"])
def test_loading_a_scaled_fp8_file_holds_at_most_115_percent_of_the_file(family, tmp_path, monkeypatch):
    """The load never holds a widened copy or a materialised placeholder: at no moment are the file's tensors and
    those torch makes while converting and building more than 1.15x the file (plus one parameter in fp32: building
    makes each parameter once before moving it to the meta device; diffusers' FLUX converter copies each split
    qkv, one block at a time, so a few blocks make that small; Qwen-Image is left out: its rotary tables are a
    fixed 4 MB, large against a tiny file).
    Building through diffusers' from_single_file copied the tensors into the requested dtype: 2x."""
    from fp8_files import LiveBytes, source, write_fp8_files

    from editkit.pipelines.core import single_file

    path = write_fp8_files(family, tmp_path, depth=8)["scaled"][0]  # deep enough that one layer is small
    counted = LiveBytes()
    read = single_file.read_state_dict
    monkeypatch.setattr(single_file, "read_state_dict", lambda *args: counted.adopt(read(*args)))
    with counted:
        component = source(family)(None, path, BF16, BF16).get()
    assert any(p.dtype == torch.float8_e4m3fn for p in component.module.parameters())
    # building a layer makes its parameters in fp32 before they move to the meta device: one at a time
    building = max(p.numel() for p in component.module.parameters()) * 4
    assert counted.peak < 1.15 * path.stat().st_size + building, counted.peak / path.stat().st_size


def test_widening_a_scaled_fp8_fill_into_kontext_inpaint_applies_the_scale(tmp_path):
    """Kontext-inpaint's widening reads Fill's input projection densely: from a scaled-fp8 Fill it must be the
    fp8 weight times its scale (the projection is then a dense layer in the compute dtype)."""
    from fp8_files import source, write_fp8_files

    from editkit.pipelines.flux.kontext_inpaint.widen import widen_fill_transformer

    path, reference_path = write_fp8_files("fill", tmp_path)["scaled"]
    widened = widen_fill_transformer(source("fill")(None, path, F32).get().module)
    expected = widen_fill_transformer(source("fill")(None, reference_path, F32).get().module)
    assert widened.x_embedder.weight.dtype == F32
    assert torch.equal(widened.x_embedder.weight, expected.x_embedder.weight)
