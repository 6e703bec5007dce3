"""core.matmul: fp32 CPU products through oneDNN where they pay, equal to torch's within float rounding."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from editkit.pipelines.core import matmul
from editkit.pipelines.core.runtime import Component

needs_onednn = pytest.mark.skipif(not matmul.available(), reason="this torch build has no oneDNN linear operator")


@pytest.fixture(autouse=True)
def decided_again():
    """Every test decides the backend afresh and leaves no choice behind."""
    matmul.set_backend(None)
    yield
    matmul.set_backend(None)


def _big(rows=48, features=1024, outputs=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, features, generator=g)
    weight = torch.randn(outputs, features, generator=g) * 0.02
    bias = torch.randn(outputs, generator=g)
    assert weight.numel() >= matmul.MIN_WEIGHTS
    return x, weight, bias


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_product_equals_torch_within_float_rounding(with_bias):
    x, weight, bias = _big()
    bias = bias if with_bias else None
    expected = F.linear(x, weight, bias)
    with matmul.using("onednn"), torch.inference_mode():
        got = matmul.linear(x, weight, bias)
        strided = matmul.linear(x.transpose(0, 1), weight, bias)  # a non-contiguous input
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (strided - expected.transpose(0, 1)).abs().max() <= 1e-5 * expected.abs().max()


@needs_onednn
def test_onednn_is_really_used_above_the_size_threshold(monkeypatch):
    calls = []
    real = matmul._onednn
    monkeypatch.setattr(matmul, "_onednn", lambda *a: calls.append(a[1].shape) or real(*a))
    x, weight, bias = _big()
    small = torch.randn(256, 256)
    with matmul.using("onednn"), torch.inference_mode():
        matmul.linear(x, weight, bias)
        tiny = matmul.linear(x[..., :256], small)
        matmul.linear(x.double(), weight.double())  # fp64: torch's
        matmul.linear(x.bfloat16(), weight.bfloat16())  # bf16: torch's (which already uses oneDNN)
    assert calls == [weight.shape]
    assert torch.equal(tiny, F.linear(x[..., :256], small)), "a small layer must stay exactly torch's product"


@needs_onednn
def test_training_keeps_torchs_product_with_its_gradient():
    x, weight, bias = _big()
    weight = weight.clone().requires_grad_(True)
    with matmul.using("onednn"):
        out = matmul.linear(x, weight, bias)
    assert out.grad_fn is not None
    out.sum().backward()
    assert torch.allclose(weight.grad, x.reshape(-1, x.shape[-1]).sum(0).expand_as(weight), atol=1e-4)


def test_environment_chooses_and_a_bad_value_is_named(monkeypatch, caplog):
    monkeypatch.setenv(matmul.ENV, "torch")
    assert matmul.backend() == "torch"
    matmul.set_backend(None)
    monkeypatch.setenv(matmul.ENV, "fastest")
    with caplog.at_level(logging.WARNING, logger="EditKit"):
        chosen = matmul.backend()
    assert chosen in ("onednn", "torch")
    assert "EDITKIT_CPU_MATMUL='fastest' is not one of auto, onednn, torch" in caplog.text
    with pytest.raises(ValueError, match="backend must be 'onednn', 'torch' or None"):
        matmul.set_backend("mkl")


@needs_onednn
def test_auto_follows_the_measurement(monkeypatch):
    monkeypatch.delenv(matmul.ENV, raising=False)
    monkeypatch.setattr(matmul, "calibrate", lambda: 0.95)
    assert matmul.backend() == "torch"
    matmul.set_backend(None)
    monkeypatch.setattr(matmul, "calibrate", lambda: 0.7)
    assert matmul.backend() == "onednn"


def test_using_restores_the_previous_choice():
    matmul.set_backend("torch")
    with matmul.using("torch"):
        pass
    assert matmul.backend() == "torch"


def test_nothing_is_adopted_where_torchs_products_are_chosen():
    matmul.set_backend("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8))
    Component(model, "diffusion", "test", torch.float32)
    assert matmul.adopt(model) == 0 and type(model[0]) is torch.nn.Linear


@needs_onednn
def test_components_adopt_plain_linears_only_and_keep_their_parameters():
    class Custom(torch.nn.Linear):
        pass

    matmul.set_backend("onednn")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), Custom(8, 4), torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4)
    expected = model(x)
    Component(model, "diffusion", "test", torch.float32)
    assert [type(m) for m in model] == [matmul.Linear, torch.nn.GELU, Custom, matmul.Linear]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(model(x), expected)
    assert matmul.adopt(model) == 0, "adopting twice changes nothing"


@needs_onednn
def test_weight_and_bias_functions_are_applied_like_comfyuis_cast_layers():
    matmul.set_backend("onednn")
    layer = torch.nn.Linear(4, 3)
    matmul.adopt(torch.nn.Sequential(layer))
    x = torch.randn(2, 4)
    plain = layer(x)
    layer.weight_function = [lambda w: w * 2]
    layer.bias_function = [lambda b: b + 1]
    patched = layer(x)
    assert torch.allclose(patched, F.linear(x, layer.weight * 2, layer.bias + 1))
    assert not torch.allclose(patched, plain)
    assert torch.equal(layer.weight, layer.weight.detach()), "the stored weight is not changed"


@needs_onednn
def test_a_real_width_flux_block_is_the_same_with_either_product():
    """A FLUX.1 double block at a width whose layers cross the threshold (8 heads x 128): oneDNN's products
    against torch's, the same module."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    torch.manual_seed(0)
    block = FluxTransformerBlock(dim=1024, num_attention_heads=8, attention_head_dim=128).eval()
    matmul.set_backend("onednn")
    assert matmul.adopt(block) > 0
    hidden, context, temb = torch.randn(1, 64, 1024), torch.randn(1, 16, 1024), torch.randn(1, 1024)
    with torch.inference_mode():
        with matmul.using("torch"):
            expected = block(hidden, context, temb)
        with matmul.using("onednn"):
            got = block(hidden, context, temb)
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@needs_onednn
def test_compiled_modules_trace_torchs_product():
    """Inside torch.compile the layer hands inductor a plain F.linear (inductor cannot lower oneDNN's operator
    for weights it has not frozen): compiling a model with adopted layers works and gives eager's result."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.SiLU())
    matmul.set_backend("onednn")
    assert matmul.adopt(model) == 1
    x = torch.randn(4, 1024)
    with matmul.using("onednn"), torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()
