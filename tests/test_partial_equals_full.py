"""A real-width model of every family gives the same output partially loaded as fully loaded (issue 17, req. 1).

``tests/test_streaming.py`` proves at real size (on the meta device) that ComfyUI's memory manager can load
part of every EditKit model and that every layer left behind streams, and at small width that the numbers do
not change. This file closes the gap between the two: each family at its **real width** (real hidden sizes,
head counts, channel widths, vocabularies and input features), shallow where the real depth would not fit
this machine (1 block, 1 + 1 for the two-stream transformers, 1 text-encoder layer; VAEs, BEN2 and the Redux
prior whole), random seeded weights, small inputs:

1. the plain module (before EditKit wraps it) gives the reference output;
2. EditKit's patcher, as ``ComfyRuntime`` makes it, is loaded by ComfyUI's ``LoadedModel`` with a budget of
   30 % of the model, onto an alias of the CPU that ComfyUI treats as another device, so ComfyUI's cast paths
   (``comfy.ops``) and EditKit's cast hooks (``pipelines/core/casting.py``) run for every layer left behind;
3. ComfyUI then gives it more memory (``model_use_more_vram``, what it does when VRAM frees up) until it is
   fully loaded, and it runs again.

Both runs must equal the reference to 1e-6 (they are bit-for-bit equal on this CPU today: a cast or a swapped
layer class that changed a single rounding would show). FLUX.1-dev and Kontext-inpaint share Fill's class and
differ only in ``x_embedder``'s input features, so Fill (384, the widest) stands for them. The Qwen3-4B encoder
is klein 4B's and Z-Image's.

Each family builds its model once, runs it three times and frees it before the next, so one test never holds
more than one model: the peak resident memory a test adds is measured (``/proc/self/status`` VmHWM, reset
per test) and must stay under 8 GiB. The big ones are marked slow (``pytest -m slow``); timings are in the
report of the change that added this file.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
from pathlib import Path

import pytest
import torch
from test_streaming import BUDGET, FAMILIES, Family, _on_device, _partial_load, _patcher

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_ROOT"), reason="set COMFYUI_ROOT to a ComfyUI checkout"),
]

PEAK_LIMIT = 8 * 2**30
TOLERANCE = 1e-6
FAST = {"clip_l", "redux_prior"}  # about 3 s each: part of the default run


def _run_qwen_vl_picture(model, device):
    """Qwen2.5-VL as Qwen-Image-Edit calls it with a picture: the vision tower (Conv3d patches, windowed
    attention, its rotary embedding, the merger) feeds 4 image tokens into the text model."""
    c = model.config
    vision = c.vision_config
    grid = torch.tensor([[1, 4, 4]])  # 16 patches of 14 x 14, merged 2 x 2 into 4 tokens
    patches = int(grid.prod())
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(patches, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2, generator=g)
    image = [c.image_token_id] * (patches // vision.spatial_merge_size**2)
    ids = torch.tensor([[3, 4, c.vision_start_token_id, *image, c.vision_end_token_id, 5, 6]])
    return model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                 pixel_values=pixels.to(device), image_grid_thw=grid.to(device)).last_hidden_state


CASE_FAMILIES = FAMILIES | {"qwen25_vl_picture": Family(FAMILIES["qwen25_vl"].build, _run_qwen_vl_picture,
                                                        "text_encoder"),
                             "qwen_edit_scaled_fp8": FAMILIES["qwen_edit"], "zimage_scaled_fp8": FAMILIES["zimage"]}
# loaded from ComfyUI's scaled fp8 files, transformers keep every Linear in fp8 (two of them at real width here;
# tests/test_streaming.py streams every family's fp8 layers at real size on the meta device)
SCALED_FP8 = {"qwen_edit_scaled_fp8", "zimage_scaled_fp8"}
# family -> the size its real width is built at ("full": the whole model is small enough)
REAL_WIDTH = {
    "flux_fill": "shallow",
    "redux_prior": "full",
    "siglip": "shallow",
    "qwen_edit": "shallow",
    "qwen_layered": "shallow",
    "zimage": "shallow",
    "qwen_edit_scaled_fp8": "shallow",
    "zimage_scaled_fp8": "shallow",
    "flux2_klein_4b": "shallow",
    "ben2": "full",
    "flux_vae": "full",
    "qwen_vae": "full",
    "qwen_layered_vae": "full",
    "flux2_vae": "full",
    "clip_l": "shallow",
    "t5_xxl": "shallow",
    "qwen25_vl": "shallow",
    "qwen25_vl_picture": "shallow",
    "qwen3": "shallow",
}
CASES = [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in sorted(REAL_WIDTH)]


def _peak_rss() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _release_freed_memory() -> None:
    """Hand memory freed by earlier tests back to the system (glibc keeps it otherwise), so that what this
    test allocates shows in its peak instead of re-using pages already counted."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.fixture()
def memory_peak(record_property):
    """Resets the process's peak resident memory; after the test, how much it rose above the start must stay
    under PEAK_LIMIT (recorded as the test's ``peak_added_gib`` property, e.g. in ``--junitxml``)."""
    gc.collect()
    _release_freed_memory()
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        pytest.skip("needs Linux /proc to measure the peak memory of one test")
    clear.write_text("5")  # 5: reset VmHWM to the current RSS
    start = _rss()
    yield
    added = _peak_rss() - start
    record_property("peak_added_gib", round(added / 2**30, 2))
    assert added < PEAK_LIMIT, f"the test added {added / 2**30:.1f} GiB at its peak (limit 8 GiB)"


@pytest.fixture()
def bridge(comfyui):
    return comfyui.pack_submodule("nodes.comfy_bridge")


def _random_weights(module: torch.nn.Module) -> None:
    """diffusers zero-initialises some output layers (and the modulations of a few): give every all-zero
    floating-point tensor seeded values, so no layer can drop out of the comparison."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point() and not tensor.any():
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.02)


def _keep_scaled_fp8(comfyui, module: torch.nn.Module) -> None:
    """Every Linear as a ComfyUI scaled-fp8 file holds it (e4m3fn weight, per-tensor scale) and EditKit's
    single-file loader keeps it (core.single_file → core.precision.keep_fp8_layers): fp8 in memory, cast
    times its scale per call."""
    precision = comfyui.pack_submodule("pipelines.core.precision")  # the classes the bridge knows
    scales = {}
    with torch.no_grad():
        for name, layer in module.named_modules():
            if type(layer) in precision.PLAIN_LINEARS:
                scale = layer.weight.abs().max().item() / torch.finfo(torch.float8_e4m3fn).max
                layer.weight = torch.nn.Parameter((layer.weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
                scales[f"{name}.weight"] = scale
    assert precision.keep_fp8_layers(module, scales, torch.float32) == len(scales) > 0


def _max_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.isfinite(expected).all(), "the reference is not finite: the comparison would prove nothing"
    return (got.float() - expected.float()).abs().max().item()


@pytest.mark.parametrize("name", CASES)
def test_real_width_partial_load_equals_full_load(name, comfyui, bridge, monkeypatch, memory_peak, record_property):
    family = CASE_FAMILIES[name]
    torch.manual_seed(0)
    module = family.build(REAL_WIDTH[name]).eval()
    _random_weights(module)
    comfyui.pack_submodule("pipelines.core.matmul").adopt(module)  # as every Component does: same products below
    if name in SCALED_FP8:
        _keep_scaled_fp8(comfyui, module)
    cpu, alias = torch.device("cpu"), torch.device("cpu", 0)  # another device for ComfyUI, the CPU for torch
    with torch.inference_mode():
        expected = family.run(module, cpu)
    _on_device(monkeypatch, alias)
    component, patcher = _patcher(comfyui, bridge, module, family.kind)
    size = patcher.model_size()
    loaded = _partial_load(patcher, int(BUDGET * size))
    assert patcher.model.model_lowvram and 0 < patcher.loaded_size() <= BUDGET * size, "not a partial load"
    streamed = [n for n, m in module.named_modules() if getattr(m, "comfy_cast_weights", False)]
    assert streamed, "nothing streams: the partial run would test nothing"
    with torch.inference_mode():
        partial = family.run(module, alias)
    loaded.model_use_more_vram(1e32)  # what ComfyUI does when memory frees up: load the rest
    assert patcher.loaded_size() == size and not patcher.model.model_lowvram, "not fully loaded"
    with torch.inference_mode():
        full = family.run(module, alias)
    differences = {"partial": _max_difference(partial, expected), "full": _max_difference(full, expected)}
    record_property("max_difference", max(differences.values()))
    assert max(differences.values()) <= TOLERANCE, (
        f"{name}: largest difference from the plain model {differences} (scale {expected.abs().max().item():.3g})")
    loaded.model_unload()
