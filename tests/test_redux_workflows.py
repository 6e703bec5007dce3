"""Redux workflows beyond "it runs": no text encoder is ever read, the base64 request shape, what they promise.

Runs through the small API runner and, with ``COMFYUI_ROOT`` set, through ComfyUI's real executor.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from test_workflows import INPUTS, collect_saved, fast, load

import editkit
from editkit.pipelines.core.loading import read_state_dict
from workflow_runner import WorkflowRunner

TEXT_ENCODER_FILES = {"clip_l_file": "clip_l.safetensors", "t5_file": "t5xxl_fp16.safetensors"}


def _redux_only(with_text_files: bool) -> dict:
    """flux_redux_variations, optionally with text encoder files picked in the Flux Loader (still unused)."""
    prompt = fast(load("flux_redux_variations"))
    if with_text_files:
        prompt["1"]["inputs"].update(TEXT_ENCODER_FILES)
    return prompt


class _Opened:
    """Records every weight file read through safetensors, and refuses text encoder loading outright."""

    def __init__(self, monkeypatch, text_module):
        self.paths: list[Path] = []
        real = safetensors.torch.load_file

        def load_file(path, *args, **kwargs):
            self.paths.append(Path(path))
            return real(path, *args, **kwargs)

        def no_text_encoders(*_args, **_kwargs):
            raise AssertionError("a Redux-only workflow loaded the FLUX.1 text encoders")

        monkeypatch.setattr(safetensors.torch, "load_file", load_file)
        monkeypatch.setattr(text_module, "_text_encoders", no_text_encoders)

    def check(self, models_root: Path):
        read_state_dict(models_root / "vae" / "ae.safetensors", "a VAE")  # the recorder itself works
        assert self.paths and self.paths[-1].name == "ae.safetensors"
        text_files = [p for p in self.paths if p.parent.name in ("text_encoders", "clip") or "text_encoder" in str(p)]
        assert not text_files, f"text encoder files opened: {text_files}"


@pytest.mark.parametrize("with_text_files", [False, True])
def test_redux_only_workflow_never_reads_text_encoders(with_text_files, models_root, torch_runtime, tmp_path,
                                                       monkeypatch):
    from editkit.pipelines.flux import text

    opened = _Opened(monkeypatch, text)
    runner = WorkflowRunner(editkit.NODE_CLASS_MAPPINGS, INPUTS, tmp_path)
    result = runner.run(_redux_only(with_text_files))
    assert result.outputs["1"][1]._value is None  # the Flux Loader's text encoder handle was never loaded
    opened.check(models_root)
    assert len(collect_saved(result.ui, _redux_only(False), tmp_path)["EditKit/flux_redux_variations"]) == 4


@pytest.mark.comfyui
def test_redux_only_workflow_never_reads_text_encoders_in_comfyui(comfyui, monkeypatch, tiny_models):
    opened = _Opened(monkeypatch, comfyui.pack_submodule("pipelines.flux.text"))
    run = comfyui.run(_redux_only(True))
    assert run.success, run.error()
    assert run.output("1", 1)._value is None
    opened.check(tiny_models)


def _picture_b64(fmt="PNG") -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(5)
    array = rng.integers(0, 256, size=(40, 56, 4), dtype=np.uint8)
    array[..., 3] = 255
    array[:10, :10, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(array, "RGBA").save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode(), array


def test_one_post_carries_the_picture(models_root, torch_runtime, tmp_path):
    """The service's request shape: the picture's base64 replaces the data widget; nothing is uploaded."""
    data, array = _picture_b64()
    prompt = _redux_only(False)
    prompt["3"]["inputs"]["data"] = data
    prompt["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}}  # what SigLIP saw
    runner = WorkflowRunner(editkit.NODE_CLASS_MAPPINGS, tmp_path / "no-inputs", tmp_path)
    (tmp_path / "no-inputs").mkdir()
    result = runner.run(prompt)
    image, mask = result.outputs["3"]
    assert torch.equal(image[0], torch.from_numpy(array[..., :3].astype(np.float32) / 255))
    assert mask[0, :10, :10].eq(1).all() and mask.sum() == 100
    saved = collect_saved(result.ui, prompt, tmp_path)["EditKit/flux_redux_variations"]
    assert len(saved) == 4
    pictures = [np.asarray(Image.open(p)) for p in saved]
    assert all(p.shape == (176, 176, 3) for p in pictures)
    assert len({p.tobytes() for p in pictures}) == 4  # four different variations


def test_prompt_workflow_appends_81_picture_tokens_to_the_prompt(models_root, torch_runtime, tmp_path):
    prompt = fast(load("flux_redux_with_prompt"))
    runner = WorkflowRunner(editkit.NODE_CLASS_MAPPINGS, INPUTS, tmp_path)
    result = runner.run(prompt)
    text = result.outputs["3"][0][0][0]
    states = result.outputs["5"][0][0][0]
    assert states.shape[1] == text.shape[1] + 81  # ceil(27 / 3)² picture tokens after the prompt
    assert torch.equal(states[:, : text.shape[1]], text)


def test_blend_weights_follow_the_widget(models_root, torch_runtime, tmp_path):
    """Blend = 0.6 x first picture's tokens + 0.4 x second's (the widget), checked against single encodes."""
    from editkit.nodes.redux_nodes import EditKitReduxEncode

    prompt = fast(load("flux_redux_blend"))
    runner = WorkflowRunner(editkit.NODE_CLASS_MAPPINGS, INPUTS, tmp_path)
    result = runner.run(prompt)
    batch = result.outputs["5"][0]
    blended = result.outputs["6"][0][0][0]
    redux, model = result.outputs["2"][0], result.outputs["1"][0]
    single = [EditKitReduxEncode().encode(redux, batch[i:i + 1], 1.0, 1.0, "area", "center", "sum", model=model)[0]
              for i in range(2)]
    expected = 0.6 * single[0][0][0][:, 512:] + 0.4 * single[1][0][0][:, 512:]
    torch.testing.assert_close(blended[:, 512:], expected, atol=1e-5, rtol=0)


class _TinyNativeFlux:
    """Test-only node: ComfyUI's own Flux model (comfy.ldm.flux) at the tiny widths, from flux1-dev.safetensors.

    ComfyUI's UNETLoader cannot load a tiny FLUX.1 file: its model detection hard-codes FLUX.1's real widths
    (hidden 3072, 24 heads, T5 width 4096). This builds the same native model class with the tiny widths, so
    ComfyUI's KSampler runs its own Flux code on EditKit's Redux conditioning.
    """

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "EditKit/test"
    path: Path = Path(".")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        import comfy.model_patcher
        import comfy.supported_models
        import comfy.utils

        sd = comfy.utils.load_torch_file(str(self.path))
        config = comfy.supported_models.Flux({
            "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 64,
            "context_in_dim": 32, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True})
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model(sd, "")
        missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        return (comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu")),)


@pytest.mark.comfyui
def test_native_ksampler_runs_on_redux_conditioning(comfyui, tiny_models, monkeypatch):
    """Redux Encode's CONDITIONING → FluxGuidance → ComfyUI's KSampler on ComfyUI's own Flux model: it runs, and
    gives EditKit · Flux Sampler's result on the same conditioning up to ComfyUI's discretised schedule."""
    _TinyNativeFlux.path = tiny_models / "diffusion_models" / "flux1-dev.safetensors"
    monkeypatch.setitem(comfyui.nodes.NODE_CLASS_MAPPINGS, "EditKitTestTinyNativeFlux", _TinyNativeFlux)
    prompt = _redux_only(False)
    del prompt["6"]
    prompt["5"]["inputs"].update(width=64, height=64, batch_size=1, steps=3)
    prompt.update({
        "10": {"class_type": "EditKitTestTinyNativeFlux", "inputs": {}},
        "11": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["10", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                             "width": 64, "height": 64}},
        "12": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 2.5}},
        "13": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "14": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "15": {"class_type": "KSampler", "inputs": {
            "model": ["11", 0], "seed": 42, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["12", 0], "negative": ["13", 0], "latent_image": ["14", 0], "denoise": 1.0}},
        "16": {"class_type": "SaveLatent", "inputs": {"samples": ["15", 0], "filename_prefix": "EditKit/redux_native"}},
        "17": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 1], "filename_prefix": "EditKit/redux_editkit"}},
    })
    run = comfyui.run(prompt)
    assert run.success, run.error()
    native, ours = run.output("15", 0)["samples"], run.output("5", 1)["samples"]
    assert native.shape == ours.shape == (1, 16, 8, 8) and torch.isfinite(native).all()
    assert run.output("4", 0)[0][0].shape[1] == 512 + 729  # the picture tokens reached the native model
    # ComfyUI picks sigmas from a 10000-point grid, diffusers/EditKit compute them: ~1e-3 apart at most
    diff, scale = (native - ours).abs(), ours.abs()
    assert float(diff.max()) < 1e-3 * float(scale.max()) and float(diff.mean()) < 1e-3 * float(scale.mean())
