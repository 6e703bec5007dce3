"""What EditKit loads inside ComfyUI is freed by ComfyUI (issue 17, fault 1 and requirement 3).

In ComfyUI's real executor: run a workflow of each family, then do what ``POST /free`` with
``unload_models`` and ``free_memory`` does between prompts (``unload_all_models``, the executor's caches
dropped, ``gc.collect``): every EditKit model object created by the run must be collected and its patcher
must leave ComfyUI's list of loaded models. Then load → run → free cycles on a model large enough for a
leak to show in the resident memory, with a fresh file identity every cycle (so a leaked model can never
be reused from the cache): RSS must not grow.

Runs only with ``COMFYUI_ROOT`` pointing at a ComfyUI checkout (see tests/comfy_inprocess.py).
"""

from __future__ import annotations

import gc
import os
import weakref

import psutil
import pytest
import torch
from test_workflows import INPUTS, fast, load

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_ROOT"), reason="set COMFYUI_ROOT to a ComfyUI checkout"),
]

# One workflow per family (with their text encoders, VAEs, BEN2, the Redux prior, SigLIP; FLUX.2 [klein] with a
# reference picture, so its VAE encodes and decodes).
FAMILY_WORKFLOWS = ["flux_fill_inpaint", "kontext_inpaint_edit", "flux_redux_variations", "ben2_remove_background",
                    "qwen_edit_text", "qwen_image_layered_decompose", "zimage_turbo_text_to_image",
                    "flux2_klein_edit"]
# The kinds of model (Component.kind) each of those runs must load, so the check covers all of them
ALL_KINDS = {"diffusion", "vae", "text_encoder"}
EXPECTED_KINDS = dict.fromkeys(FAMILY_WORKFLOWS, ALL_KINDS) | {"ben2_remove_background": {"segmentation"}}


def _components(comfyui) -> list:
    """Every live EditKit model object (``Component``) of the pack as ComfyUI loaded it."""
    component_class = comfyui.pack_submodule("pipelines.core.runtime").Component
    return [obj for obj in gc.get_objects() if isinstance(obj, component_class)]


def _free(comfyui) -> None:
    """What ComfyUI's prompt worker does after ``POST /free {"unload_models": true, "free_memory": true}``:
    unload every model, drop the executor's output caches (here: the executor of each run is dropped by
    the caller), collect garbage."""
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


def _editkit_patchers(comfyui) -> list:
    import comfy.model_management as mm

    holder = comfyui.pack_submodule("nodes.comfy_bridge")._Holder
    return [m for m in mm.current_loaded_models if m.model is not None and isinstance(m.model.model, holder)]


def _run(comfyui, small_inputs, prompt) -> None:
    comfyui.use_inputs(small_inputs)
    try:
        run = comfyui.run(prompt)
    finally:
        comfyui.use_inputs(INPUTS)
    assert run.success, run.error()


@pytest.mark.parametrize("name", FAMILY_WORKFLOWS)
def test_free_collects_every_model(name, comfyui, small_inputs):
    _free(comfyui)
    before = {id(c) for c in _components(comfyui)}
    _run(comfyui, small_inputs, fast(load(name)))
    created = [c for c in _components(comfyui) if id(c) not in before]
    assert created, f"{name} loaded no EditKit model: the check would test nothing"
    kinds = {c.kind for c in created}
    assert kinds >= EXPECTED_KINDS[name], f"{name} loaded only {sorted(kinds)}: the check would miss some models"
    assert _editkit_patchers(comfyui), "the run's models never reached ComfyUI's memory manager"
    refs = [(c.name, weakref.ref(c), weakref.ref(c.module)) for c in created]
    del created
    _free(comfyui)
    alive = [name for name, component, module in refs if component() is not None or module() is not None]
    assert not alive, f"still in memory after /free: {alive}"
    assert not _editkit_patchers(comfyui), "ComfyUI still lists EditKit models as loaded"


def _medium_fill_file(tiny_models):
    """A FLUX.1-Fill transformer of ~27M parameters (108 MB in fp32, as ``--cpu`` computes) with the tiny
    tree's text widths, so it runs with the tiny text encoders and VAE of the FLUX.1-Fill-dev folder."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from editkit.pipelines.flux import layout
    from tiny.flux1 import TINY_TRANSFORMER

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**dict(TINY_TRANSFORMER, num_attention_heads=4, num_layers=2,
                                          num_single_layers=2))
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in
          layout.diffusers_transformer_to_bfl(model.state_dict()).items()}
    path = tiny_models / "diffusion_models" / "editkit-test-medium-fill.safetensors"
    save_file(sd, str(path))
    return path, sum(v.numel() for v in sd.values()) * 4


def _medium_klein_file(tiny_models):
    """A FLUX.2 [klein] transformer of ~26M parameters (4 heads of 128, 2 + 2 blocks; 105 MB in fp32) in
    ComfyUI's BFL layout with the tiny tree's text width, so it runs with the tiny Qwen3 encoder and VAE."""
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import save_file

    from tiny import flux2
    from tiny.core import COMFY_PREFIX

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**dict(flux2.TINY_TRANSFORMER, num_attention_heads=4, num_layers=2,
                                    num_single_layers=2))
    sd = {COMFY_PREFIX + k: v.to(torch.bfloat16).contiguous() for k, v in
          flux2.diffusers_to_bfl(model.state_dict()).items()}
    path = tiny_models / "diffusion_models" / "editkit-test-medium-klein.safetensors"
    save_file(sd, str(path))
    return path, sum(v.numel() for v in sd.values()) * 4


@pytest.mark.parametrize("workflow,medium_file", [
    ("flux_fill_inpaint", _medium_fill_file),
    # ~95 s on 2 busy cores (the run above proves FLUX.2's models are collected in the default run)
    pytest.param("flux2_klein_edit", _medium_klein_file, marks=pytest.mark.slow),
])
def test_load_run_free_cycles_do_not_grow_memory(workflow, medium_file, comfyui, tiny_models, small_inputs):
    """Every cycle gives the file a new modification time, so the loader must read it again: a model kept
    alive by anything would add its ~105 MB to the resident memory at every cycle."""
    path, model_bytes = medium_file(tiny_models)
    prompt = fast(load(workflow))
    loader, sampler = prompt["1"]["inputs"], prompt["4"]["inputs"]
    assert "transformer_file" in loader and "seed" in sampler, f"{workflow}: the loader or sampler moved"
    loader["transformer_file"] = path.name
    process = psutil.Process()
    try:
        rss = []
        for cycle in range(6):
            os.utime(path, ns=(cycle * 10**9 + 10**18, cycle * 10**9 + 10**18))
            sampler["seed"] = cycle  # a new cache key: the sampler really runs
            _run(comfyui, small_inputs, prompt)
            _free(comfyui)
            rss.append(process.memory_info().rss)
        growth = rss[-1] - rss[0]  # after the first cycle: imports, allocator pools and the small models are in
        assert growth < max(0.05 * rss[0], model_bytes), (
            f"RSS grew by {growth / 2**20:.0f} MiB over {len(rss) - 1} cycles "
            f"({[round(r / 2**20) for r in rss]} MiB; one model is {model_bytes / 2**20:.0f} MiB)")
    finally:
        path.unlink()
