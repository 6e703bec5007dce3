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
    # Load Image's empty 64x64 mask is named as such (issue 8), and the type reads as a class name.
    assert "Paint a mask or load a picture with transparency" in error["exception_message"]
    assert error["exception_type"] == "editkit.EditKitError"


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


def test_onednn_layers_run_as_comfyuis_own_linear_on_a_gpu_and_as_editkits_on_a_cpu(comfyui):
    """core.matmul's Linear (oneDNN products) is for CPU compute: a model ComfyUI places on a GPU gets ComfyUI's
    own cast-capable Linear for those layers, a model it runs on the CPU keeps EditKit's (made cast-capable)."""
    import comfy.ops

    bridge = comfyui.pack_submodule("nodes.comfy_bridge")
    matmul = comfyui.pack_submodule("pipelines.core.matmul")

    def adopted():
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        model[0].__class__ = matmul.Linear  # as core.matmul.adopt leaves it where oneDNN pays
        return model

    on_gpu, on_cpu = adopted(), adopted()
    assert bridge.make_castable(on_gpu, torch.device("cuda", 0))
    assert bridge.make_castable(on_cpu, torch.device("cpu"))
    assert type(on_gpu[0]) is comfy.ops.disable_weight_init.Linear
    assert isinstance(on_cpu[0], matmul.Linear) and isinstance(on_cpu[0], comfy.ops.CastWeightBiasOp)


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


# --------------------------------------------------------------------------------------
# Precision flags and GGUF streaming inside ComfyUI's model management (issues 7 and 14)


def _precision_of(bridge, kind, requested=None):
    found = bridge.precision(kind, requested)
    return found.storage, found.compute


def test_precision_flags_decide_auto_dtypes(comfyui, tiny_models, monkeypatch):
    """ComfyUI's flags and per-device rules, simulated in-process as the flags set them, decide every auto
    dtype; an explicit choice on the node wins."""
    import comfy.model_management as mm
    from comfy.cli_args import args

    bridge = comfyui.pack_submodule("nodes.comfy_bridge")
    F32, BF16, F16, FP8 = torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn
    # --cpu (this process): ComfyUI's own CPU rules
    assert _precision_of(bridge, "diffusion") == (F32, F32)
    assert _precision_of(bridge, "text_encoder") == (F16, F32)  # ComfyUI: fp16 stored, fp32 computed
    assert _precision_of(bridge, "vae") == (F32, F32)
    for flag, stored in (("bf16_unet", BF16), ("fp16_unet", F16), ("fp8_e4m3fn_unet", FP8)):
        monkeypatch.setattr(args, flag, True)
        assert _precision_of(bridge, "diffusion") == (stored, F32), flag  # manual cast to fp32 on a CPU
        assert _precision_of(bridge, "diffusion", F32) == (F32, F32)  # the node's explicit choice wins
        monkeypatch.setattr(args, flag, False)
    for flag, stored in (("fp32_text_enc", F32), ("bf16_text_enc", BF16), ("fp8_e4m3fn_text_enc", FP8)):
        monkeypatch.setattr(args, flag, True)
        assert _precision_of(bridge, "text_encoder") == (stored, F32), flag
        monkeypatch.setattr(args, flag, False)
    monkeypatch.setattr(args, "bf16_vae", True)
    assert _precision_of(bridge, "vae") == (BF16, BF16)
    monkeypatch.setattr(args, "bf16_vae", False)

    # a GPU with bf16 (ComfyUI's per-device answers simulated), then one with fp16 only
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(mm, "get_torch_device", lambda: gpu)
    monkeypatch.setattr(mm, "cpu_state", mm.CPUState.GPU)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(mm, "should_use_bf16", lambda device=None, *a, **k: device is None or device.type == "cuda")
    monkeypatch.setattr(mm, "should_use_fp16", lambda device=None, *a, **k: device is None or device.type == "cuda")
    assert _precision_of(bridge, "diffusion") == (BF16, BF16)
    assert _precision_of(bridge, "vae") == (BF16, BF16)
    assert _precision_of(bridge, "text_encoder") == (F16, F32)
    monkeypatch.setattr(args, "fp32_unet", True)
    assert _precision_of(bridge, "diffusion") == (F32, F32)
    monkeypatch.setattr(args, "fp32_unet", False)
    monkeypatch.setattr(args, "fp32_vae", True)
    assert _precision_of(bridge, "vae") == (F32, F32)
    monkeypatch.setattr(args, "fp32_vae", False)
    monkeypatch.setattr(mm, "should_use_bf16", lambda device=None, *a, **k: False)
    assert _precision_of(bridge, "diffusion") == (F16, F16)
    assert _precision_of(bridge, "vae") == (F32, F32)  # FLUX.1's VAE is never fp16 unless --fp16-vae says so


def test_bf16_unet_flag_reaches_the_loaded_transformer(comfyui, models_root, monkeypatch):
    """--bf16-unet on a CPU: the loader stores the transformer in bf16 and computes in fp32, like ComfyUI."""
    from comfy.cli_args import args

    nodes = comfyui.pack_submodule("nodes.flux_nodes")
    precision = comfyui.pack_submodule("pipelines.core.precision")
    monkeypatch.setattr(args, "bf16_unet", True)
    model, _text, _vae = nodes.EditKitFluxLoader().load("FLUX.1-Fill-dev", "flux1-fill-dev.safetensors",
                                                        "(from folder)", "(from folder)", "(from folder)")
    component = model.transformer.get()
    assert component.dtype == torch.float32
    linears = [m for m in component.module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, precision.CastLinear) and m.weight.dtype == torch.bfloat16 for m in linears)


def _gguf(comfyui, tiny_models, tag):
    loading = comfyui.pack_submodule("pipelines.flux.loading")
    path = tiny_models / "diffusion_models" / "flux1-fill-dev-Q8_0.gguf"
    return loading.transformer_source(None, path, torch.float32).derived(f"{tag}-{id(object())}", lambda c: c,
                                                                          "GGUF").get()


def _untrack(mm, runtime, component):
    mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if m.model is not runtime.patcher(component)]


def test_gguf_partial_load_equals_full_load(comfyui, tiny_models, monkeypatch):
    """A GGUF transformer loaded partly by ComfyUI's memory manager (the rest streamed layer by layer,
    weights quantized on the offload device) gives the full load's output. The GPU is simulated by an alias
    of the CPU that ComfyUI treats as another device."""
    import comfy.model_management as mm

    bridge = comfyui.pack_submodule("nodes.comfy_bridge")
    gguf_mod = comfyui.pack_submodule("pipelines.core.gguf")
    alias = torch.device("cpu", 0)
    monkeypatch.setattr(mm, "get_torch_device", lambda: alias)
    monkeypatch.setenv("EDITKIT_GGUF_CACHE", "off")  # compare the streamed computation itself
    runtime = bridge.ComfyRuntime()
    full = _gguf(comfyui, tiny_models, "full")
    partial = _gguf(comfyui, tiny_models, "partial")
    try:
        assert runtime.acquire(full) == alias
        assert runtime.patcher(full).loaded_size() == runtime.patcher(full).model_size()
        expected = _forward(full.module, alias)
        patcher = runtime.patcher(partial)  # cast-capable GGUF layers
        layers = [m for m in partial.module.modules() if isinstance(m, gguf_mod.GGUFLinear)]
        assert layers and all(hasattr(m, "comfy_cast_weights") for m in layers)
        loaded = mm.LoadedModel(patcher)
        loaded.model_load(lowvram_model_memory=patcher.model_size() // 2)  # ComfyUI's partial load, half the bytes
        assert patcher.model.model_lowvram and 0 < patcher.loaded_size() < patcher.model_size()
        streamed = [m for m in layers if m.comfy_cast_weights]
        assert streamed and len(streamed) < len(layers)
        assert all(m.weight.dtype == torch.uint8 for m in layers)  # still quantized, wherever they are
        assert torch.equal(_forward(partial.module, alias), expected)
    finally:
        _untrack(mm, runtime, full)
        _untrack(mm, runtime, partial)


def test_gguf_streams_under_novram(comfyui, tiny_models, monkeypatch):
    """--novram with the meta device as the GPU: nothing of the GGUF model is loaded, every layer copies its
    quantized bytes to the GPU and dequantizes there per call."""
    import comfy.model_management as mm

    bridge = comfyui.pack_submodule("nodes.comfy_bridge")
    fake_gpu = torch.device("meta")
    monkeypatch.setattr(mm, "get_torch_device", lambda: fake_gpu)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    monkeypatch.setattr(mm, "get_free_memory",
                        lambda dev=None, torch_free_too=False: (1 << 34, 1 << 34) if torch_free_too else 1 << 34)
    runtime = bridge.ComfyRuntime()
    component = _gguf(comfyui, tiny_models, "novram")
    try:
        assert runtime.acquire(component) == fake_gpu
        assert runtime.patcher(component).loaded_size() == 0
        assert {p.device.type for p in component.module.parameters()} == {"cpu"}
        assert _forward(component.module, fake_gpu).shape == (1, 16, 64)
        assert component.extras["dequant_cache"].budget == 0  # GPU compute: no cache
    finally:
        _untrack(mm, runtime, component)


def test_dequant_cache_dropped_when_comfyui_frees_memory(comfyui, tiny_models, monkeypatch):
    import comfy.model_management as mm

    bridge = comfyui.pack_submodule("nodes.comfy_bridge")
    gguf_mod = comfyui.pack_submodule("pipelines.core.gguf")
    monkeypatch.setenv("EDITKIT_GGUF_CACHE", "auto")
    runtime = bridge.ComfyRuntime()
    component = _gguf(comfyui, tiny_models, "cache")
    cache = component.extras["dequant_cache"]
    cpu = torch.device("cpu")
    try:
        device = runtime.acquire(component)
        assert cache.budget > 0  # part of what ComfyUI reports free on the CPU
        expected = _forward(component.module, device)
        assert cache.layers > 0
        mm.unload_all_models()  # "Unload models", /free: the manager takes its memory back
        assert cache.layers == 0 and cache.used == 0
        assert all(m._dense is None for m in component.module.modules() if isinstance(m, gguf_mod.GGUFLinear))
        device = runtime.acquire(component)
        assert torch.equal(_forward(component.module, device), expected)
        assert cache.layers > 0
        runtime.patcher(component).partially_unload(cpu, memory_to_free=1)  # evicted in part for another model
        assert cache.layers == 0
        assert torch.equal(_forward(component.module, runtime.acquire(component)), expected)
    finally:
        _untrack(mm, runtime, component)


def test_dequant_cache_survives_reacquiring_a_loaded_model(comfyui, tiny_models, monkeypatch):
    """Issue 23: ``load_models_gpu`` detaches a model that is already loaded (``unpatch_all=False``) before
    loading it again; that is no unload, so the dequantized layers of the first run are still there at the
    second acquire (before, every acquire emptied the cache). A real unload (/free) still drops them."""
    import comfy.model_management as mm

    bridge = comfyui.pack_submodule("nodes.comfy_bridge")
    gguf_mod = comfyui.pack_submodule("pipelines.core.gguf")
    monkeypatch.setenv("EDITKIT_GGUF_CACHE", "auto")
    runtime = bridge.ComfyRuntime()
    component = _gguf(comfyui, tiny_models, "reacquire")
    cache = component.extras["dequant_cache"]
    layers = [m for m in component.module.modules() if isinstance(m, gguf_mod.GGUFLinear)]
    try:
        expected = _forward(component.module, runtime.acquire(component))
        cached = {id(m): m._dense for m in layers if m._dense is not None}
        assert cached and cache.layers == len(cached)
        for _ in range(2):  # the next runs: the model is still in current_loaded_models
            device = runtime.acquire(component, memory_required=1 << 20)
            assert [m.model for m in mm.current_loaded_models].count(runtime.patcher(component)) == 1
            assert {id(m): m._dense for m in layers if m._dense is not None}.keys() == cached.keys()
            assert all(m._dense is cached[id(m)] for m in layers if id(m) in cached)  # the same tensors
            assert torch.equal(_forward(component.module, device), expected)
        mm.unload_all_models()  # POST /free {"unload_models": true}
        assert cache.layers == 0 and cache.used == 0 and all(m._dense is None for m in layers)
    finally:
        _untrack(mm, runtime, component)


def test_fp8_matmul_follows_comfyui_fast_flag(comfyui, monkeypatch):
    """``--fast fp8_matrix_mult`` (or bare ``--fast``) on a device ComfyUI says computes in fp8 switches EditKit's fp8
    layers to fp8 matmul, as ComfyUI's own; without the flag, or on a device without fp8 compute, they cast."""
    import comfy.model_management as mm
    from comfy.cli_args import PerformanceFeature, args

    bridge = comfyui.pack_submodule("nodes.comfy_bridge")
    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: True)
    monkeypatch.setattr(args, "fast", set())
    assert bridge.fp8_matmul_from_flags() is False
    monkeypatch.setattr(args, "fast", {PerformanceFeature.Fp8MatrixMultiplication})
    assert bridge.fp8_matmul_from_flags() is True
    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: False)
    assert bridge.fp8_matmul_from_flags() is False
