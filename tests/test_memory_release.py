"""Memory a freed model leaves behind (issue 17, requirement 3): heap trimmed, GGUF weights not copied."""

from __future__ import annotations

import gc

import torch

from editkit.pipelines.core import heap
from editkit.pipelines.core.runtime import Component


def test_heap_is_trimmed_after_the_collection_that_frees_a_model(monkeypatch):
    """The trim waits for the collection after the model's destruction (a weakref callback runs before the
    tensors are released, when trimming would return nothing), and happens once per freed model."""
    gc.collect()  # models freed by earlier tests are trimmed for now
    calls = []
    monkeypatch.setattr(heap, "return_freed_memory", lambda: calls.append("trim") or True)
    monkeypatch.setattr(heap, "_due", False)
    component = Component(torch.nn.Linear(4, 4), "diffusion", "probe", torch.float32)
    gc.collect()
    assert calls == []  # alive: nothing to give back
    del component
    gc.collect()
    assert calls == ["trim"]
    gc.collect()
    assert calls == ["trim"]  # not again until another model goes


def test_trim_runs_on_this_platform():
    """On Linux glibc the trim is real (elsewhere there is no malloc_trim, and it says so)."""
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert heap.return_freed_memory() is True


def test_flux_gguf_double_block_qkv_stay_views_of_the_mapped_file(tiny_models):
    """diffusers' converter copies a double block's q, k and v out of the fused qkv (``torch.cat([chunk])``); EditKit
    splits them as views, so a mapped GGUF file is not copied into the heap (1.1 GB of FLUX.1-dev Q8_0)."""
    from editkit.pipelines.flux.loading import transformer_source

    path = tiny_models / "diffusion_models" / "flux1-fill-dev-Q8_0.gguf"
    module = transformer_source(None, path, torch.float32).get().module
    for attn in (module.transformer_blocks[0].attn,):
        for group in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
            pointers = {getattr(attn, name).weight.untyped_storage().data_ptr() for name in group}
            assert len(pointers) == 1, f"{group} were copied out of the fused qkv"


def test_gguf_decode_buffers_go_with_the_model(tiny_models):
    """The reused buffer uncached GGUF layers decode into is dropped when the model's cache is cleared (ComfyUI frees
    it) or the model is collected, so a freed GGUF model leaves no weight-sized buffer behind."""
    from editkit.pipelines.core import gguf
    from editkit.pipelines.flux.loading import transformer_source

    gguf._scratch(1000, torch.float32)
    gguf.DequantCache().clear()
    assert not gguf._scratch_buffers
    component = transformer_source(None, tiny_models / "diffusion_models" / "flux1-fill-dev-Q8_0.gguf",
                                   torch.float32).get()
    gguf._scratch(1000, torch.float32)  # as a step through its uncached layers would
    assert gguf._scratch_buffers
    del component
    gc.collect()
    assert not gguf._scratch_buffers
