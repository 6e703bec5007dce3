"""Every bundled API-format workflow validates as shipped and runs end to end on the tiny models, keeping its promises.

Without ComfyUI the workflows run through ``workflow_runner`` (ComfyUI's API semantics and validation rules,
with stand-ins for the native nodes); with ``COMFYUI_ROOT`` set they also run through ComfyUI's real executor
in this process. Each workflow is first validated exactly as shipped; to keep the suite fast the run then
substitutes (see :func:`fast`):

* small pictures: every example picture shrunk by ``SMALL_FACTOR`` (768 → 128, sides multiples of 16), loaded
  under its shipped name from another input folder;
* 2 sampler steps, BEN2 at its smallest working resolution (128), T5 prompts of 64 tokens, and width/height
  widgets shrunk like the pictures.

Everything else (file names, links, widget values) runs as shipped. The checks are what each workflow promises
to a user: which files it saves and their sizes, pixels it promises not to touch, the number of history pictures.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import editkit
from packload import ROOT
from tiny import flux2, qwen_layered, zimage
from workflow_runner import NATIVE_STANDINS, WorkflowError, WorkflowRunner, small_size

API_DIR = ROOT / "workflows" / "api"
INPUTS = ROOT / "workflows" / "inputs"
WORKFLOWS = sorted(p.stem for p in API_DIR.glob("*.json"))

# What each workflow saves in the test run (small pictures): {filename_prefix: (count, width, height)}.
# A new workflow adds its line here (sizes as its small test run gives them; see the module docstring).
EXPECTED_OUTPUTS = {
    "flux_fill_inpaint": {"EditKit/flux_fill_inpaint": (1, 128, 128)},
    "flux_fill_outpaint": {"EditKit/flux_fill_outpaint": (1, 80 + 128 + 128, 128)},  # 80x128 picture, +128 each side
    "ben2_remove_background": {"EditKit/ben2_cutout": (1, 128, 128), "EditKit/ben2_mask": (1, 128, 128)},
    "ben2_flux_fill_background": {"EditKit/ben2_flux_fill_background": (1, 128, 128)},
    "kontext_inpaint_edit": {"EditKit/kontext_inpaint_edit": (1, 128, 128)},
    "kontext_inpaint_multi_round": {"EditKit/kontext_inpaint_final": (1, 128, 128),
                                    "EditKit/kontext_inpaint_history": (5, 128, 128)},
    "flux_dev_text_to_image": {"EditKit/flux_dev_text_to_image": (1, 176, 176)},  # 1024² widgets shrunk
    "flux_redux_variations": {"EditKit/flux_redux_variations": (4, 176, 176)},  # 1024² widgets shrunk
    "flux_redux_blend": {"EditKit/flux_redux_blend": (1, 176, 176)},
    "flux_redux_with_prompt": {"EditKit/flux_redux_with_prompt": (1, 176, 176)},
    "zimage_turbo_text_to_image": {"EditKit/zimage_turbo_text_to_image": (1, 112, 144)},  # 672x864 shrunk
    "zimage_progressive": {"EditKit/zimage_progressive": (1, 112, 144),  # stages shrunk: 32² → 64² → 112x144
                           "EditKit/zimage_progressive_stages": (3, 112, 144)},
    "zimage_progressive_nodes": {"EditKit/zimage_progressive_nodes": (1, 128, 128)},  # 32² → 64² → 2x
    "qwen_edit_appearance": {"EditKit/qwen_edit_appearance": (1, 112, 128)},  # "match image 1": 640x768 shrunk
    "qwen_edit_text": {"EditKit/qwen_edit_text": (1, 128, 128)},
    "qwen_edit_multi_image": {"EditKit/qwen_edit_multi_image": (1, 112, 128)},
    "ben2_qwen_edit": {"EditKit/ben2_qwen_edit": (1, 112, 128)},
    "qwen_edit_2511": {"EditKit/qwen_edit_2511": (1, 128, 128)},  # "match image 1": the 768² portrait shrunk
    "qwen_image_layered_decompose": {"EditKit/qwen_layered": (4, 64, 64)},  # 4 layers, resolution 640 → 64
    "flux2_klein_edit": {"EditKit/flux2_klein_edit": (1, 112, 128)},  # "from image_1": the tracksuit shrunk
    "flux2_klein_multi_reference": {"EditKit/flux2_klein_multi_reference": (1, 112, 128)},
    "flux2_klein_inpaint": {"EditKit/flux2_klein_inpaint": (1, 128, 128)},
    "ben2_flux2_klein_background": {"EditKit/ben2_flux2_klein_background": (1, 128, 128)},
}
# Widget values replaced in the test run (input name -> value), only where the input is a constant.
FAST = {"steps": 2, "max_sequence_length": 64,
        "custom_vl_size": 56, "custom_vae_size": 64}  # Qwen-Image reference copies (pictures 2+): 1 MP → 64²
BEN2_RESOLUTION = 128


def load(name: str) -> dict:
    with open(API_DIR / f"{name}.json", encoding="utf-8") as handle:
        return json.load(handle)


def fast(prompt: dict) -> dict:
    """The prompt with the test substitutions (small sizes, few steps); pictures are swapped by the input folder."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        for key, value in FAST.items():
            if key in inputs and not isinstance(inputs[key], list):
                inputs[key] = value
        if node["class_type"] == "EditKitBEN2RemoveBackground" and not isinstance(inputs.get("resolution"), list):
            inputs["resolution"] = BEN2_RESOLUTION
        if isinstance(inputs.get("width"), int) and isinstance(inputs.get("height"), int):
            inputs["width"], inputs["height"] = small_size(inputs["width"], inputs["height"])
        if node["class_type"] in qwen_layered.TINY_TREE_INPUTS:  # Qwen-Image-Layered: 64² bucket
            inputs.update(qwen_layered.TINY_TREE_INPUTS[node["class_type"]])
        if node["class_type"] in flux2.TINY_TREE_INPUTS:  # FLUX.2: the folder's tokenizer and encoder
            inputs.update(flux2.TINY_TREE_INPUTS[node["class_type"]])
        if node["class_type"] in zimage.TINY_TREE_INPUTS:  # Z-Image: tiny-tree files, shrunk stages
            inputs.update(zimage.TINY_TREE_INPUTS[node["class_type"]])
        if node["class_type"] == "EditKitZImageProgressive" and isinstance(inputs.get("stages"), str):
            inputs["stages"] = zimage.small_stages(inputs["stages"], small_size, FAST["steps"])
    return prompt


@dataclass
class Ran:
    """One finished run, seen the way a user sees it: saved files, the pictures it loaded, node outputs."""

    prompt: dict
    saved: dict[str, list[Path]]  # filename_prefix -> saved files, in order
    inputs_dir: Path
    node_output: object  # (node_id, slot) -> the node's output value

    def picture(self, prefix: str, index: int = 0) -> np.ndarray:
        with Image.open(self.saved[prefix][index]) as image:
            return np.asarray(image).copy()

    def loaded(self, node_id: str) -> np.ndarray:
        """The picture a LoadImage node read (RGB or RGBA, uint8)."""
        with Image.open(self.inputs_dir / self.prompt[node_id]["inputs"]["image"]) as image:
            return np.asarray(image).copy()


def collect_saved(ui: dict, prompt: dict, output_root: Path) -> dict[str, list[Path]]:
    saved: dict[str, list[Path]] = {}
    for node_id, outputs in ui.items():
        prefix = prompt[node_id]["inputs"].get("filename_prefix")
        for item in outputs.get("images", []):
            saved.setdefault(prefix, []).append(output_root / item["subfolder"] / item["filename"])
    return saved


def check_saved(name: str, saved: dict[str, list[Path]]) -> None:
    expected = EXPECTED_OUTPUTS[name]
    assert set(saved) == set(expected), f"{name} saved {sorted(saved)}"
    for prefix, (count, width, height) in expected.items():
        assert len(saved[prefix]) == count, f"{prefix}: {len(saved[prefix])} pictures, expected {count}"
        for path in saved[prefix]:
            with Image.open(path) as picture:
                assert picture.size == (width, height), f"{path.name}: {picture.size}, expected {(width, height)}"


# ---------------------------------------------------------------------------------------------------------------
# What each workflow promises beyond its output files (keyed by workflow name; optional for new workflows)


def _unchanged(result: np.ndarray, source: np.ndarray, keep: np.ndarray, what: str) -> None:
    assert keep.any(), f"{what}: the test picture has no pixel that must stay unchanged"
    diff = np.abs(result[..., :3].astype(int) - source[..., :3].astype(int)).max(axis=-1)
    assert diff[keep].max() == 0, f"{what}: {int((diff[keep] > 0).sum())} of {int(keep.sum())} kept pixels changed"


def promise_inpaint(ran: Ran, prefix: str = "EditKit/flux_fill_inpaint") -> None:
    """Pixels outside the painted area (alpha 255: MASK 0) come back exactly; the painted area is repainted."""
    source = ran.loaded("3")
    result = ran.picture(prefix)
    alpha = source[..., 3]
    _unchanged(result, source, alpha == 255, "inpaint")
    changed = np.abs(result.astype(int) - source[..., :3].astype(int)).max(axis=-1) > 0
    assert changed[alpha == 0].mean() > 0.5, "the transparent area was not repainted"


def promise_outpaint(ran: Ran) -> None:
    """The original picture sits at (left, top) of the bigger canvas, untouched beyond the feathered band."""
    inputs = ran.prompt["4"]["inputs"]
    left, top, right, bottom, feather = (inputs[k] for k in ("left", "top", "right", "bottom", "feathering"))
    source = ran.loaded("3")
    result = ran.picture("EditKit/flux_fill_outpaint")
    h, w = source.shape[:2]
    inner = result[top:top + h, left:left + w]
    keep = np.ones((h, w), dtype=bool)
    if left:
        keep[:, :feather] = False
    if right:
        keep[:, w - feather:] = False
    if top:
        keep[:feather] = False
    if bottom:
        keep[h - feather:] = False
    _unchanged(inner, source, keep, "outpaint")


def promise_cutout(ran: Ran) -> None:
    """The cut-out is an RGBA picture whose alpha is the saved mask; the mask is not empty or constant noise."""
    cutout = ran.picture("EditKit/ben2_cutout")
    mask = ran.picture("EditKit/ben2_mask")
    assert cutout.ndim == 3 and cutout.shape[-1] == 4, "the cut-out has no alpha channel"
    mask = mask if mask.ndim == 2 else mask[..., 0]
    assert np.array_equal(cutout[..., 3], mask)
    matte = np.asarray(ran.node_output("3", 1))[0]
    assert np.array_equal(np.clip(255.0 * matte, 0, 255).astype(np.uint8), mask)


def promise_new_background(ran: Ran, prefix: str = "EditKit/ben2_flux_fill_background", picture: str = "2",
                           ben2: str = "3") -> None:
    """The repaint is blended with BEN2's inverted soft mask: a pixel may move at most by its mask value (subject
    pixels with mask 0 come back exactly), and the background (mask > 0.5) is repainted."""
    source = ran.loaded(picture)
    result = ran.picture(prefix)
    mask = np.asarray(ran.node_output(ben2, 1))[0]  # 1 = background (invert on)
    assert mask.shape == source.shape[:2]
    assert mask.min() < 0.5, "the test picture has no protected pixels: the check would test nothing"
    diff = np.abs(result.astype(int) - source[..., :3].astype(int)).max(axis=-1)
    allowed = 255.0 * mask + 1.0  # |gen - source| <= 1, plus SaveImage's truncation
    allowed[mask == 0] = 0
    assert (diff <= allowed).all(), f"{int((diff > allowed).sum())} pixels moved more than their mask allows"
    assert (diff[mask > 0.5] > 0).mean() > 0.5, "the background was not repainted"


def promise_multi_round(ran: Ran) -> None:
    """One history picture per instruction line; the final picture is the last round's."""
    lines = [line for line in ran.prompt["4"]["inputs"]["instructions"].splitlines() if line.strip()]
    assert len(ran.saved["EditKit/kontext_inpaint_history"]) == len(lines)
    assert np.array_equal(ran.picture("EditKit/kontext_inpaint_final"),
                          ran.picture("EditKit/kontext_inpaint_history", len(lines) - 1))


def promise_same_size_edit(ran: Ran) -> None:
    source = ran.loaded("3")
    assert ran.picture("EditKit/kontext_inpaint_edit").shape[:2] == source.shape[:2]


def promise_size_of(ran: Ran, prefix: str, node_id: str) -> None:
    """FLUX.2 edits come out at image_1's size (sides already multiples of 16 in the test pictures)."""
    assert ran.picture(prefix).shape[:2] == ran.loaded(node_id).shape[:2]


def promise_subject_only_edit(ran: Ran) -> None:
    """Qwen-Image edits only BEN2's subject: the result is blended with BEN2's soft mask at the input's size, so a
    pixel moves at most by its mask value (mask 0: exactly the input)."""
    source = ran.loaded("2")
    result = ran.picture("EditKit/ben2_qwen_edit")
    mask = np.asarray(ran.node_output("4", 1))[0]  # 1 = subject (invert off)
    assert result.shape[:2] == source.shape[:2] == mask.shape
    assert mask.min() < 0.5, "the test mask protects nothing: the check would test nothing"
    diff = np.abs(result.astype(int) - source[..., :3].astype(int)).max(axis=-1)
    allowed = 255.0 * mask + 1.0  # |edit - source| <= mask in 0..1, plus SaveImage's truncation
    allowed[mask == 0] = 0
    assert (diff <= allowed).all(), f"{int((diff > allowed).sum())} pixels moved more than their mask allows"


def promise_rgba_layers(ran: Ran) -> None:
    """Qwen-Image-Layered saves one transparent PNG per layer, whose alpha is the node's MASK output."""
    alpha = np.asarray(ran.node_output("3", 1))
    assert len(ran.saved["EditKit/qwen_layered"]) == ran.prompt["3"]["inputs"]["layers"] == alpha.shape[0]
    for index in range(alpha.shape[0]):
        layer = ran.picture("EditKit/qwen_layered", index)
        assert layer.ndim == 3 and layer.shape[-1] == 4, "a layer was saved without its alpha channel"
        assert np.array_equal(layer[..., 3], np.clip(255.0 * alpha[index], 0, 255).astype(np.uint8))


def promise_2511_from_its_weights(ran: Ran) -> None:
    """The loader says it loaded Qwen-Image-Edit-2511, recognised by the file's marker tensor, and the transformer
    the edit ran with has zero_cond_t on."""
    said = ran.node_output("1", 3)
    assert said == "Qwen-Image-Edit-2511, from the file's __index_timestep_zero__ tensor", said
    assert ran.node_output("1", 0).transformer.get().module.config.zero_cond_t


PROMISES = {
    "qwen_edit_2511": promise_2511_from_its_weights,
    "qwen_image_layered_decompose": promise_rgba_layers,
    "ben2_qwen_edit": promise_subject_only_edit,
    "flux_fill_inpaint": promise_inpaint,
    "flux_fill_outpaint": promise_outpaint,
    "ben2_remove_background": promise_cutout,
    "ben2_flux_fill_background": promise_new_background,
    "kontext_inpaint_edit": promise_same_size_edit,
    "kontext_inpaint_multi_round": promise_multi_round,
    "flux2_klein_inpaint": lambda ran: promise_inpaint(ran, "EditKit/flux2_klein_inpaint"),
    "ben2_flux2_klein_background": lambda ran: promise_new_background(ran, "EditKit/ben2_flux2_klein_background",
                                                                      picture="3", ben2="5"),
    "flux2_klein_edit": lambda ran: promise_size_of(ran, "EditKit/flux2_klein_edit", "3"),
    "flux2_klein_multi_reference": lambda ran: promise_size_of(ran, "EditKit/flux2_klein_multi_reference", "3"),
}


def check_run(name: str, prompt: dict, saved: dict, inputs_dir: Path, node_output) -> None:
    check_saved(name, saved)
    promise = PROMISES.get(name)
    if promise is not None:
        promise(Ran(prompt, saved, inputs_dir, node_output))


# ---------------------------------------------------------------------------------------------------------------
# The API-format runner (no ComfyUI needed)


def test_every_workflow_has_expectations():
    assert WORKFLOWS, "no workflows found"
    assert set(WORKFLOWS) <= set(EXPECTED_OUTPUTS), "add the new workflow's outputs to EXPECTED_OUTPUTS"


def test_substitutions_shrink_without_changing_the_graph():
    for name in WORKFLOWS:
        shipped, small = load(name), fast(load(name))
        assert set(shipped) == set(small)
        for node_id, node in shipped.items():
            for key, value in node["inputs"].items():
                if isinstance(value, list):
                    assert small[node_id]["inputs"][key] == value  # links untouched
    assert small_size(768, 768) == (128, 128) and small_size(512, 768) == (80, 128)


@pytest.fixture()
def bundled_tokenizers(models_root, monkeypatch):
    """Stand-ins for the tokenizer files ComfyUI bundles (single-file CLIP-L/T5/Qwen2.5-VL need them): the tiny ones."""
    from editkit.nodes import comfy_bridge

    folder = models_root / "diffusers" / "FLUX.1-Fill-dev"
    found = {"clip_l": folder / "tokenizer", "t5": folder / "tokenizer_2",
             "qwen25": models_root / "diffusers" / "Qwen-Image-Edit-2509" / "tokenizer"}
    original = comfy_bridge.comfy_tokenizer_dir
    monkeypatch.setattr(comfy_bridge, "comfy_tokenizer_dir", lambda which: found.get(which) or original(which))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_with_the_api_runner(name, models_root, torch_runtime, small_inputs, tmp_path,
                                           bundled_tokenizers):
    prompt = load(name)
    native = {n["class_type"] for n in prompt.values()} - set(editkit.NODE_CLASS_MAPPINGS) - set(NATIVE_STANDINS)
    if native:
        pytest.skip(f"needs ComfyUI's own {', '.join(sorted(native))} (runs in test_workflow_runs_in_comfyui)")
    WorkflowRunner(editkit.NODE_CLASS_MAPPINGS, INPUTS, tmp_path).validate(prompt)  # as shipped
    runner = WorkflowRunner(editkit.NODE_CLASS_MAPPINGS, small_inputs, tmp_path)
    prompt = fast(prompt)
    result = runner.run(prompt)
    check_run(name, prompt, collect_saved(result.ui, prompt, tmp_path), small_inputs,
              lambda node_id, slot: result.outputs[node_id][slot])


def test_runner_rejects_what_comfyui_rejects(models_root):
    runner = WorkflowRunner(editkit.NODE_CLASS_MAPPINGS, INPUTS, Path("."))
    prompt = load("flux_fill_inpaint")
    broken = copy.deepcopy(prompt)
    del broken["4"]["inputs"]["mask"]
    with pytest.raises(WorkflowError, match="required input 'mask' missing"):
        runner.validate(broken)
    broken = copy.deepcopy(prompt)
    broken["4"]["inputs"]["mask"] = ["3", 0]  # IMAGE into a MASK input
    with pytest.raises(WorkflowError, match="gets IMAGE, expects MASK"):
        runner.validate(broken)
    broken = copy.deepcopy(prompt)
    broken["1"]["inputs"]["transformer_file"] = "flux1-dev.safetensors-missing"
    with pytest.raises(WorkflowError, match="not in"):
        runner.validate(broken)


def native_conditioning_variant(zero_out: bool) -> dict:
    """flux_fill_inpaint with the prompt passed through native FluxGuidance (and ConditioningZeroOut)."""
    prompt = fast(load("flux_fill_inpaint"))
    prompt["10"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 12.0}}
    source = ["10", 0]
    if zero_out:
        prompt["11"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["10", 0]}}
        source = ["11", 0]
    prompt["4"]["inputs"]["conditioning"] = source
    return prompt


@pytest.mark.parametrize("zero_out", [False, True])
def test_native_conditioning_nodes_feed_editkit_samplers(zero_out, models_root, torch_runtime, small_inputs,
                                                         tmp_path, caplog):
    runner = WorkflowRunner(editkit.NODE_CLASS_MAPPINGS, small_inputs, tmp_path)
    prompt = native_conditioning_variant(zero_out)
    with caplog.at_level("INFO", logger="EditKit"):
        result = runner.run(prompt)
    assert "using guidance 12.00 from the CONDITIONING" in caplog.text
    check_run("flux_fill_inpaint", prompt, collect_saved(result.ui, prompt, tmp_path), small_inputs,
              lambda node_id, slot: result.outputs[node_id][slot])


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI's real executor (COMFYUI_ROOT)


@pytest.fixture()
def comfyui_small(comfyui, small_inputs):
    """The in-process ComfyUI reading the small pictures, restored to the shipped ones afterwards."""
    comfyui.use_inputs(small_inputs)
    yield comfyui
    comfyui.use_inputs(INPUTS)


def _comfy_check(comfyui, name: str, prompt: dict, run, inputs_dir: Path) -> None:
    assert run.success, run.error()
    check_run(name, prompt, collect_saved(run.ui, prompt, comfyui.output_dir()), inputs_dir, run.output)


@pytest.mark.comfyui
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_in_comfyui(name, comfyui, small_inputs):
    prompt = load(name)
    comfyui.use_inputs(INPUTS)
    ok, error, _outputs, node_errors = comfyui.validate(prompt)  # as shipped, by ComfyUI itself
    assert ok, (error, node_errors)
    prompt = fast(prompt)
    comfyui.use_inputs(small_inputs)
    try:
        run = comfyui.run(prompt)
    finally:
        comfyui.use_inputs(INPUTS)
    _comfy_check(comfyui, name, prompt, run, small_inputs)
    assert comfyui.progress, "no progress reported"
    value, total, _ = comfyui.progress[-1]
    assert value == total  # the last progress bar ran to its end


@pytest.mark.comfyui
@pytest.mark.parametrize("zero_out", [False, True])
def test_native_conditioning_nodes_in_comfyui(zero_out, comfyui_small, small_inputs):
    prompt = native_conditioning_variant(zero_out)
    run = comfyui_small.run(prompt)
    _comfy_check(comfyui_small, "flux_fill_inpaint", prompt, run, small_inputs)
