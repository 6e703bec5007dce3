"""Every family's attention goes through PyTorch's SDPA (issue 23, GPU paths): on a GPU that is what picks
the flash / memory-efficient kernels. A processor swapped for one that computes softmax(QK^T)V by hand, or
a dispatch backend other than torch's native SDPA, fails here."""

from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from editkit.pipelines.flux import flow
from editkit.pipelines.flux.loading import transformer_source, vae_source


def _processors(module):
    return {type(m.processor) for m in module.modules() if hasattr(m, "processor")}


def _uses_sdpa(processor_class) -> bool:
    source = inspect.getsource(processor_class.__call__)
    return "dispatch_attention_fn" in source or "scaled_dot_product_attention" in source


def test_flux_transformer_calls_sdpa_once_per_block(tiny_models, monkeypatch):
    folder = tiny_models / "diffusers" / "FLUX.1-Fill-dev"
    module = transformer_source(folder, None, torch.float32).get().module
    assert _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        module(hidden_states=torch.randn(1, 16, 384, generator=g), timestep=torch.tensor([0.5]),
               guidance=torch.tensor([30.0]), pooled_projections=torch.randn(1, 64, generator=g),
               encoder_hidden_states=torch.randn(1, 7, 32, generator=g), txt_ids=flow.text_ids(7, "cpu"),
               img_ids=flow.token_ids(8, 8, 0, "cpu"), return_dict=False)
    blocks = len(module.transformer_blocks) + len(module.single_transformer_blocks)
    assert len(calls) == blocks


def test_every_family_attention_processor_uses_sdpa(tiny_models):
    from tiny import qwen_image, zimage

    folder = tiny_models / "diffusers" / "FLUX.1-Fill-dev"
    qwen = qwen_image.FAMILY.components()
    modules = {"FLUX.1 transformer": transformer_source(folder, None, torch.float32).get().module,
               "FLUX.1 VAE": vae_source(folder, None, torch.float32).get().module,
               "Qwen-Image transformer": qwen["transformer"], "Qwen-Image VAE": qwen["vae"],
               "Z-Image transformer": zimage.FAMILY.build("transformer")}
    for name, module in modules.items():
        processors = _processors(module)
        # The Qwen-Image (Wan) VAE's attention block has no processor: its forward calls SDPA itself.
        blocks = {type(m) for m in module.modules() if type(m).__name__.endswith("AttentionBlock")}
        assert processors or blocks, name
        assert all(_uses_sdpa(p) for p in processors), (name, processors)
        assert all("scaled_dot_product_attention" in inspect.getsource(b.forward) for b in blocks), (name, blocks)
