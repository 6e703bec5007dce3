"""BEN2 nodes called the way ComfyUI calls them, with tiny checkpoints in a models folder."""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.nodes import ben2_nodes
from editkit.nodes.ben2_nodes import EditKitBEN2Loader, EditKitBEN2RemoveBackground
from editkit.nodes.comfy_bridge import set_models_root, set_runtime
from editkit.pipelines.ben2 import BEN2Base, BEN2Config, save_ben2_checkpoint
from editkit.pipelines.errors import ModelFileError
from editkit.pipelines.runtime import Component, TorchRuntime


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


@pytest.fixture
def runtime():
    rt = TorchRuntime("cpu")
    set_runtime(rt)
    yield rt
    set_runtime(None)


def call(cls, **inputs):
    """Fill unset inputs with their INPUT_TYPES defaults, then call FUNCTION, like ComfyUI."""
    spec = cls.INPUT_TYPES()["required"]
    kwargs = {name: opts[1]["default"] for name, opts in spec.items() if "default" in opts[1]}
    kwargs.update(inputs)
    assert set(kwargs) == set(spec), "every required input must be given or have a default"
    return getattr(cls(), cls.FUNCTION)(**kwargs)


@pytest.mark.parametrize("cls", ben2_nodes.NODES)
def test_node_contract(cls, models_root):
    assert editkit.NODE_CLASS_MAPPINGS[cls.__name__] is cls
    assert editkit.NODE_DISPLAY_NAME_MAPPINGS[cls.__name__] == cls.DISPLAY_NAME
    assert cls.__name__.startswith("EditKit") and cls.DISPLAY_NAME.startswith("EditKit · ")
    assert cls.CATEGORY == "EditKit/background removal" and cls.DESCRIPTION
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    assert callable(getattr(cls, cls.FUNCTION))
    for name, spec in cls.INPUT_TYPES()["required"].items():
        assert spec[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"


def test_loader_lists_and_loads_both_formats(models_root, runtime):
    choices = EditKitBEN2Loader.INPUT_TYPES()["required"]["model_name"][0]
    assert choices == ["ben2_tiny.safetensors", "birefnet.safetensors", "legacy/BEN2_Base.pth"]
    outputs = [call(EditKitBEN2Loader, model_name=name)[0] for name in (choices[0], choices[2])]
    for component in outputs:
        assert isinstance(component, Component) and isinstance(component.module, BEN2Base)
        assert component.kind == "segmentation" and component.dtype == torch.float32  # auto on a CPU machine
        assert component.device.type == "cpu"
    first, second = (c.module.state_dict() for c in outputs)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_loader_precision_choice(models_root):
    (component,) = call(EditKitBEN2Loader, model_name="ben2_tiny.safetensors", precision="bf16")
    assert component.dtype == torch.bfloat16
    assert {p.dtype for p in component.module.parameters()} == {torch.bfloat16}


def test_loader_errors_name_the_file(models_root):
    with pytest.raises(ModelFileError, match="Not a BEN2 Base checkpoint") as info:
        call(EditKitBEN2Loader, model_name="birefnet.safetensors")
    assert "birefnet.safetensors" in str(info.value) and "BiRefNet" in str(info.value)
    with pytest.raises(ModelFileError, match="not found"):
        call(EditKitBEN2Loader, model_name="gone.safetensors")


def test_remove_background_processes_the_whole_batch(models_root, runtime):
    (model,) = call(EditKitBEN2Loader, model_name="ben2_tiny.safetensors")
    images = torch.rand(3, 100, 150, 3, generator=torch.Generator().manual_seed(2))
    image, mask = call(EditKitBEN2RemoveBackground, ben2_model=model, image=images, resolution=256, batch_size=2)
    assert image.shape == (3, 100, 150, 3) and mask.shape == (3, 100, 150)
    assert image.dtype == mask.dtype == torch.float32 and mask.device.type == "cpu"
    assert mask.min() >= 0 and mask.max() <= 1 and torch.isfinite(image).all()
    assert not torch.allclose(mask[0], mask[1]) and not torch.allclose(mask[1], mask[2])
    # The same images one by one give the same masks: batching is only a speed choice.
    for i in range(3):
        _, alone = call(EditKitBEN2RemoveBackground, ben2_model=model, image=images[i : i + 1], resolution=256)
        torch.testing.assert_close(alone[0], mask[i], atol=1e-5, rtol=0)


def test_remove_background_rgba_and_keep_aspect(models_root, runtime):
    (model,) = call(EditKitBEN2Loader, model_name="ben2_tiny.safetensors")
    images = torch.rand(1, 60, 400, 4)  # RGBA input, very wide
    image, mask = call(
        EditKitBEN2RemoveBackground,
        ben2_model=model,
        image=images,
        resolution=512,
        resize_mode="keep aspect ratio",
        background="alpha (RGBA)",
    )
    assert image.shape == (1, 60, 400, 4) and torch.equal(image[..., 3], mask)


def test_interruption_propagates_from_the_node(models_root, runtime):
    (model,) = call(EditKitBEN2Loader, model_name="ben2_tiny.safetensors")
    runtime.interrupt()
    with pytest.raises(editkit.pipelines.errors.Interrupted):
        call(EditKitBEN2RemoveBackground, ben2_model=model, image=torch.rand(2, 64, 64, 3), resolution=128)
