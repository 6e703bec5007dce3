"""Every bundled API-format workflow validates and runs end to end on the tiny models.

Without ComfyUI the workflows run through ``workflow_runner`` (ComfyUI's API semantics and
validation rules, with stand-ins for the native nodes); with ``COMFYUI_ROOT`` set they also run
through ComfyUI's real executor in this process. To keep the suite fast, sampler steps are cut
to 2; everything else (file names, sizes, links) runs exactly as shipped.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

import editkit
from packload import ROOT
from workflow_runner import WorkflowError, WorkflowRunner

API_DIR = ROOT / "workflows" / "api"
INPUTS = ROOT / "workflows" / "inputs"
WORKFLOWS = sorted(p.stem for p in API_DIR.glob("*.json"))

# What each workflow saves: {filename_prefix: (count, width, height)}.
EXPECTED_OUTPUTS = {
    "flux_fill_inpaint": {"EditKit/flux_fill_inpaint": (1, 768, 768)},
    "flux_fill_outpaint": {"EditKit/flux_fill_outpaint": (1, 768, 768)},
    "ben2_remove_background": {"EditKit/ben2_cutout": (1, 768, 768), "EditKit/ben2_mask": (1, 768, 768)},
    "ben2_flux_fill_background": {"EditKit/ben2_flux_fill_background": (1, 768, 768)},
    "kontext_inpaint_edit": {"EditKit/kontext_inpaint_edit": (1, 768, 768)},
    "kontext_inpaint_multi_round": {"EditKit/kontext_inpaint_final": (1, 768, 768),
                                    "EditKit/kontext_inpaint_history": (5, 768, 768)},
}
FAST = {"steps": 2}


def load(name: str) -> dict:
    with open(API_DIR / f"{name}.json", encoding="utf-8") as handle:
        return json.load(handle)


def fast(prompt: dict) -> dict:
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        for key, value in FAST.items():
            if key in node["inputs"] and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = value
    return prompt


def check_saved(name: str, output_root: Path, ui: dict, prompt: dict) -> None:
    saved: dict[str, list[Path]] = {}
    for node_id, outputs in ui.items():
        prefix = prompt[node_id]["inputs"].get("filename_prefix")
        for item in outputs.get("images", []):
            saved.setdefault(prefix, []).append(output_root / item["subfolder"] / item["filename"])
    expected = EXPECTED_OUTPUTS[name]
    assert set(saved) == set(expected), f"{name} saved {sorted(saved)}"
    for prefix, (count, width, height) in expected.items():
        assert len(saved[prefix]) == count, prefix
        for path in saved[prefix]:
            with Image.open(path) as picture:
                assert picture.size == (width, height), f"{path.name}: {picture.size}"


def test_every_workflow_has_expectations():
    assert WORKFLOWS, "no workflows found"
    assert set(WORKFLOWS) <= set(EXPECTED_OUTPUTS), "add the new workflow's outputs to EXPECTED_OUTPUTS"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_with_the_api_runner(name, models_root, torch_runtime, tmp_path):
    prompt = load(name)
    runner = WorkflowRunner(editkit.NODE_CLASS_MAPPINGS, INPUTS, tmp_path)
    runner.validate(prompt)  # as shipped
    result = runner.run(fast(prompt))
    check_saved(name, tmp_path, result.ui, prompt)


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
    broken["1"]["inputs"]["transformer_file"] = "flux1-dev.safetensors"
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
def test_native_conditioning_nodes_feed_editkit_samplers(zero_out, models_root, torch_runtime, tmp_path, caplog):
    runner = WorkflowRunner(editkit.NODE_CLASS_MAPPINGS, INPUTS, tmp_path)
    with caplog.at_level("INFO", logger="EditKit"):
        result = runner.run(native_conditioning_variant(zero_out))
    assert "using guidance 12.00 from the CONDITIONING" in caplog.text
    check_saved("flux_fill_inpaint", tmp_path, result.ui, load("flux_fill_inpaint"))




@pytest.mark.comfyui
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_in_comfyui(name, comfyui):
    prompt = load(name)
    ok, error, _outputs, node_errors = comfyui.validate(prompt)  # as shipped, by ComfyUI itself
    assert ok, (error, node_errors)
    run = comfyui.run(fast(prompt))
    assert run.success, run.error()
    check_saved(name, comfyui.output_dir(), run.ui, prompt)
    assert comfyui.progress, "no progress reported"
    value, total, _ = comfyui.progress[-1]
    assert value == total  # the last progress bar ran to its end


@pytest.mark.comfyui
@pytest.mark.parametrize("zero_out", [False, True])
def test_native_conditioning_nodes_in_comfyui(zero_out, comfyui):
    run = comfyui.run(native_conditioning_variant(zero_out))
    assert run.success, run.error()
    check_saved("flux_fill_inpaint", comfyui.output_dir(), run.ui, load("flux_fill_inpaint"))
