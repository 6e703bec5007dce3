"""BEN2 nodes called the way ComfyUI calls them, with tiny checkpoints in a models folder."""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.nodes.ben2_nodes import EditKitBEN2Loader, EditKitBEN2RemoveBackground
from editkit.nodes.comfy_bridge import set_models_root
from editkit.pipelines.ben2 import BEN2Base, BEN2Config, save_ben2_checkpoint
from editkit.pipelines.core.errors import ModelFileError
from editkit.pipelines.core.runtime import Component
from node_calls import call_node


@pytest.fixture
def models_root(tmp_path):
    folder = tmp_path / "background_removal"
    with torch.random.fork_rng():
        torch.manual_seed(11)
        tiny = BEN2Base(BEN2Config.tiny())
    save_ben2_checkpoint(tiny, folder / "ben2_tiny.safetensors")
    save_ben2_checkpoint(tiny, folder / "legacy" / "BEN2_Base.pth")
    save_ben2_checkpoint({"bb.layers.0.weight": torch.zeros(2)}, folder / "birefnet.safetensors")
    (folder / "notes.txt").write_text("not a model")
    set_models_root(tmp_path)
    yield folder
    set_models_root(None)


def test_loader_lists_and_loads_both_formats(models_root, torch_runtime):
    choices = EditKitBEN2Loader.INPUT_TYPES()["required"]["model_name"][0]
    assert choices == ["ben2_tiny.safetensors", "birefnet.safetensors", "legacy/BEN2_Base.pth"]
    outputs = [call_node(EditKitBEN2Loader, model_name=name)[0] for name in (choices[0], choices[2])]
    for component in outputs:
        assert isinstance(component, Component) and isinstance(component.module, BEN2Base)
        assert component.kind == "segmentation" and component.dtype == torch.float32  # auto on a CPU machine
        assert component.device.type == "cpu"
    first, second = (c.module.state_dict() for c in outputs)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_loader_precision_choice(models_root):
    (component,) = call_node(EditKitBEN2Loader, model_name="ben2_tiny.safetensors", precision="bf16")
    assert component.dtype == torch.bfloat16
    assert {p.dtype for p in component.module.parameters()} == {torch.bfloat16}


def test_loader_errors_name_the_file(models_root):
    with pytest.raises(ModelFileError, match="Not a BEN2 Base checkpoint") as info:
        call_node(EditKitBEN2Loader, model_name="birefnet.safetensors")
    assert "birefnet.safetensors" in str(info.value) and "BiRefNet" in str(info.value)
    with pytest.raises(ModelFileError, match="not found"):
        call_node(EditKitBEN2Loader, model_name="gone.safetensors")


def test_remove_background_processes_the_whole_batch(models_root, torch_runtime):
    (model,) = call_node(EditKitBEN2Loader, model_name="ben2_tiny.safetensors")
    images = torch.rand(3, 100, 150, 3, generator=torch.Generator().manual_seed(2))
    image, mask = call_node(EditKitBEN2RemoveBackground, ben2_model=model, image=images, resolution=256, batch_size=2)
    assert image.shape == (3, 100, 150, 3) and mask.shape == (3, 100, 150)
    assert image.dtype == mask.dtype == torch.float32 and mask.device.type == "cpu"
    assert mask.min() >= 0 and mask.max() <= 1 and torch.isfinite(image).all()
    assert not torch.allclose(mask[0], mask[1]) and not torch.allclose(mask[1], mask[2])
    # The same images one by one give the same masks: batching is only a speed choice.
    for i in range(3):
        _, alone = call_node(EditKitBEN2RemoveBackground, ben2_model=model, image=images[i : i + 1], resolution=256)
        torch.testing.assert_close(alone[0], mask[i], atol=1e-5, rtol=0)


def test_remove_background_rgba_and_keep_aspect(models_root, torch_runtime):
    (model,) = call_node(EditKitBEN2Loader, model_name="ben2_tiny.safetensors")
    images = torch.rand(1, 60, 400, 4)  # RGBA input, very wide
    image, mask = call_node(
        EditKitBEN2RemoveBackground,
        ben2_model=model,
        image=images,
        resolution=512,
        resize_mode="keep aspect ratio",
        background="alpha (RGBA)",
    )
    assert image.shape == (1, 60, 400, 4) and torch.equal(image[..., 3], mask)


def test_interruption_propagates_from_the_node(models_root, torch_runtime):
    (model,) = call_node(EditKitBEN2Loader, model_name="ben2_tiny.safetensors")
    torch_runtime.interrupt()
    with pytest.raises(editkit.pipelines.core.errors.Interrupted):
        call_node(EditKitBEN2RemoveBackground, ben2_model=model, image=torch.rand(2, 64, 64, 3), resolution=128)


def test_file_errors_read_cleanly(models_root):
    """No ``.:`` / ``)).`` seams where the problem, the file and the expectation are joined, and ComfyUI's
    ``exception_type`` (module + qualname) reads as a class name, not the pack's folder path (issue 8)."""
    with pytest.raises(ModelFileError) as info:
        call_node(EditKitBEN2Loader, model_name="birefnet.safetensors")
    message = str(info.value)
    assert message.startswith("'birefnet.safetensors' in folder ")
    for seam in (".:", "..", ")).", ".)", ". ."):
        assert seam not in message, (seam, message)
    assert message.count("Expected ") == 1 and message.endswith("folder.")
    cls = type(info.value)
    assert f"{cls.__module__}.{cls.__qualname__}" == "editkit.ModelFileError"
