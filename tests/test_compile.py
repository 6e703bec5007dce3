"""Regional compilation (issue 23): the ``compile`` loader input and pipelines/core/compile.py."""

from __future__ import annotations

import logging

import pytest
import torch

from editkit.nodes import common
from editkit.pipelines.core import compile as regional
from editkit.pipelines.core.errors import EditKitError
from editkit.pipelines.core.loading import LazyModel
from editkit.pipelines.core.runtime import Component
from editkit.pipelines.flux import flow
from editkit.pipelines.flux.loading import transformer_source

F32 = torch.float32


def _component(tiny_models, tag):
    folder = tiny_models / "diffusers" / "FLUX.1-Fill-dev"
    return transformer_source(folder, None, F32).derived(tag, lambda c: c, "tiny").get()


def _call(module):
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return module(hidden_states=torch.randn(1, 16, 384, generator=g), timestep=torch.tensor([0.5]),
                      guidance=torch.tensor([30.0]), pooled_projections=torch.randn(1, 64, generator=g),
                      encoder_hidden_states=torch.randn(1, 7, 32, generator=g), txt_ids=flow.text_ids(7, "cpu"),
                      img_ids=flow.token_ids(8, 8, 0, "cpu"), return_dict=False)[0]


def test_settings_and_the_auto_rule(tiny_models):
    """auto compiles only on CUDA with dense weights (on the CPU compiling costs more than it saves per run); off never;
    a bad setting says what is allowed."""
    component = _component(tiny_models, "compile-rules")
    assert regional.pays_on(torch.device("cuda"), quantized=False)
    assert not regional.pays_on(torch.device("cuda"), quantized=True)
    assert not regional.pays_on(torch.device("cpu"), quantized=False)
    assert regional.apply(component, "off") is False and regional.apply(component, "auto", "cpu") is False
    assert not getattr(component.module, "_editkit_compiled", False)
    with pytest.raises(EditKitError, match="off, auto, on"):
        regional.apply(component, "sometimes")


def test_loader_handle_stays_shared_where_nothing_compiles():
    """The node helper returns the very same handle for off and for auto on the CPU (no second copy of the
    model), and a separate handle (a separate load) for on."""
    lazy = LazyModel(("x",), lambda: None, "x")
    assert common.with_compile(lazy, "off") is lazy
    assert common.with_compile(lazy, "auto") is lazy  # the tests run on the CPU
    compiled = common.with_compile(lazy, "on")
    assert compiled is not lazy and compiled.key[0].startswith("compiled/")
    with pytest.raises(EditKitError, match="compile must be one of"):
        common.with_compile(lazy, "yes")


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_log_the_first_call(tiny_models, caplog):
    """compile=on compiles FLUX.1's two block classes through diffusers' compile_repeated_blocks; the outputs
    stay within 1e-4 of the uncompiled model, the first call is logged with its time, and applying twice
    compiles once."""
    eager = _component(tiny_models, "compile-eager")
    compiled = _component(tiny_models, "compile-on")
    assert isinstance(compiled, Component) and compiled.module is not eager.module
    expected = _call(eager.module)
    assert regional.apply(compiled, "on", "cpu") is True
    blocks = [m for m in compiled.module.modules() if type(m).__name__ in compiled.module._repeated_blocks]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    with caplog.at_level(logging.INFO, logger="EditKit"):
        first = _call(compiled.module)
    assert any("compilation included" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_call(compiled.module), expected, atol=1e-4, rtol=1e-4)
    assert regional.apply(compiled, "on", "cpu") is True  # idempotent
