"""EditKit inside ComfyUI's process: memory manager, interruption, errors, previews, folders.

Runs only with ``COMFYUI_ROOT`` pointing at a ComfyUI checkout (see tests/comfy_inprocess.py).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from packload import ROOT

COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_ROOT, reason="set COMFYUI_ROOT to a ComfyUI checkout"),
]


def _workflow(name: str, steps: int = 2) -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))
    for node in prompt.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    return prompt


def test_models_join_comfyui_memory_management(comfyui, tiny_models):
    import comfy.model_management as mm

    bridge = comfyui.pack_submodule("nodes.comfy_bridge")
    loading = comfyui.pack_submodule("pipelines.flux.loading")
    assert bridge.HAVE_COMFY and isinstance(bridge.runtime(), bridge.ComfyRuntime)
    mm.unload_all_models()
    for path in ("flux1-fill-dev.safetensors", "flux1-fill-dev-Q8_0.gguf"):
        component = loading.transformer_source(None, tiny_models / "diffusion_models" / path, torch.float32).get()
        runtime = bridge.runtime()
        device = runtime.acquire(component, memory_required=1 << 20)
        assert device == mm.get_torch_device()
        patcher = runtime.patcher(component)
        tracked = [m.model for m in mm.current_loaded_models]
        assert patcher in tracked, path
        assert patcher.model_size() == sum(t.numel() * t.element_size() for t in component.module.state_dict().values())
        runtime.acquire(component)  # a second use re-uses the tracked entry
        assert [m.model for m in mm.current_loaded_models].count(patcher) == 1
        mm.unload_all_models()  # what POST /free {"unload_models": true} does between prompts
        assert patcher not in [m.model for m in mm.current_loaded_models]


def test_progress_and_previews_reach_comfyui(comfyui):
    from comfy.cli_args import LatentPreviewMethod, args

    saved = args.preview_method
    args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        run = comfyui.run(_workflow("flux_fill_inpaint", steps=3))
    finally:
        args.preview_method = saved
    assert run.success, run.error()
    sampler_updates = [p for p in comfyui.progress if p[1] == 3]
    assert [p[0] for p in sampler_updates] == [1, 2, 3]
    assert all(has_preview for _, _, has_preview in sampler_updates)


def test_interrupt_stops_the_sampler(comfyui):
    import comfy.model_management as mm
    import comfy.utils

    def interrupt_at_step_one(value, total, preview, node_id=None):
        comfy_progress(value, total, preview, node_id)
        if total == 5 and value == 1:
            mm.interrupt_current_processing(True)

    comfy_progress = comfyui._on_progress
    comfy.utils.set_progress_bar_global_hook(interrupt_at_step_one)
    try:
        prompt = _workflow("flux_fill_inpaint", steps=5)
        prompt["4"]["inputs"]["seed"] = 777  # a new cache key: the sampler must really run
        run = comfyui.run(prompt)
    finally:
        comfy.utils.set_progress_bar_global_hook(comfyui._on_progress)
        mm.interrupt_current_processing(False)
    assert not run.success
    assert run.error()["event"] == "execution_interrupted"
    assert [p[0] for p in comfyui.progress if p[1] == 5] == [1]


def test_runtime_errors_reach_the_user(comfyui):
    prompt = copy.deepcopy(_workflow("flux_fill_inpaint"))
    prompt["3"]["inputs"]["image"] = "editkit_landscape.png"  # 512x768 picture, no alpha: 64x64 MASK
    run = comfyui.run(prompt)
    assert not run.success
    error = run.error()
    assert error["event"] == "execution_error" and error["node_id"] == "4"
    assert "Mask is 64x64 but the image is 512x768" in error["exception_message"]


def test_background_removal_folder_is_registered(comfyui):
    import folder_paths

    assert "background_removal" in folder_paths.folder_names_and_paths
    assert {".safetensors", ".pth"} <= set(folder_paths.folder_names_and_paths["background_removal"][1])


def _forward(module, device, width=32, pooled=64):
    from editkit.pipelines.flux.flow import text_ids, token_ids

    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 16, 384, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([30.0]), pooled_projections=torch.randn(1, pooled, generator=g),
                encoder_hidden_states=torch.randn(1, 7, width, generator=g))
    with torch.inference_mode():
        return module(**{k: v.to(device) for k, v in args.items()}, txt_ids=text_ids(7, device),
                      img_ids=token_ids(8, 8, 0, device), return_dict=False)[0]


def _fresh(comfyui, tiny_models, kind):
    loading = comfyui.pack_submodule("pipelines.flux.loading")
    folder = tiny_models / "diffusers" / "FLUX.1-Fill-dev"
    source = loading.transformer_source if kind == "transformer" else loading.vae_source
    return source(folder, None, torch.float32).derived(f"lowvram-{kind}-{id(object())}", lambda c: c, kind).get()


def test_cast_capable_swap_is_exact(comfyui, tiny_models):
    bridge = comfyui.pack_submodule("nodes.comfy_bridge")
    component = _fresh(comfyui, tiny_models, "transformer")
    before = _forward(component.module, torch.device("cpu"))
    assert bridge.make_castable(component.module)
    assert torch.equal(_forward(component.module, torch.device("cpu")), before)


def test_novram_streams_every_layer(comfyui, tiny_models, monkeypatch):
    """--novram on a GPU machine, simulated with the meta device as the GPU: nothing is loaded, every
    layer casts its weights to the GPU per call, and the transformer and VAE still run there."""
    import comfy.model_management as mm

    bridge = comfyui.pack_submodule("nodes.comfy_bridge")
    fake_gpu = torch.device("meta")
    monkeypatch.setattr(mm, "get_torch_device", lambda: fake_gpu)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    monkeypatch.setattr(mm, "get_free_memory",
                        lambda dev=None, torch_free_too=False: (1 << 34, 1 << 34) if torch_free_too else 1 << 34)
    runtime = bridge.ComfyRuntime()
    transformer, vae = _fresh(comfyui, tiny_models, "transformer"), _fresh(comfyui, tiny_models, "vae")
    try:
        assert runtime.acquire(transformer) == fake_gpu
        assert runtime.patcher(transformer).loaded_size() == 0
        assert {p.device.type for p in transformer.module.parameters()} == {"cpu"}
        assert _forward(transformer.module, fake_gpu).shape == (1, 16, 64)
        assert runtime.acquire(vae) == fake_gpu
        with torch.inference_mode():
            assert vae.module.decode(torch.randn(1, 16, 8, 8, device=fake_gpu)).sample.shape == (1, 3, 64, 64)
    finally:
        for component in (transformer, vae):
            mm.current_loaded_models[:] = [m for m in mm.current_loaded_models
                                           if m.model is not runtime.patcher(component)]
