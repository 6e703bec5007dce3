"""Loader nodes built from a family's declaration (nodes/family_loader.py) keep ComfyUI's contract.

ComfyUI hands ``VALIDATE_INPUTS`` exactly the inputs its signature names and skips its own list check for
those; the generated method must therefore name the file widgets and nothing else, so the precision and option
widgets keep ComfyUI's "value not in list" check.
"""

from __future__ import annotations

import inspect

import pytest

from editkit.nodes.family_loader import declared_loader
from editkit.nodes.flux2_nodes import EditKitFlux2Loader
from editkit.nodes.flux_nodes import EditKitFluxLoader
from editkit.nodes.kontext_nodes import EditKitKontextInpaintLoader
from editkit.nodes.qwen_image_nodes import EditKitQwenImageLoader
from editkit.nodes.qwen_layered_nodes import EditKitQwenImageLayeredLoader
from editkit.nodes.redux_nodes import EditKitReduxLoader
from editkit.nodes.zimage_nodes import EditKitZImageLoader

DECLARED = [EditKitFluxLoader, EditKitQwenImageLoader, EditKitQwenImageLayeredLoader, EditKitReduxLoader,
            EditKitZImageLoader, EditKitFlux2Loader]

# The widget order each loader has always had: UI workflows store widget values by position.
ORDER = {
    EditKitFluxLoader: ["diffusers_folder", "transformer_file", "vae_file", "clip_l_file", "t5_file", "weight_dtype",
                        "compile"],
    EditKitQwenImageLoader: ["diffusers_folder", "transformer_file", "text_encoder_file", "vae_file", "variant",
                             "weight_dtype", "compile"],
    EditKitQwenImageLayeredLoader: ["diffusers_folder", "transformer_file", "text_encoder_file", "vae_file",
                                    "weight_dtype", "compile"],
    EditKitReduxLoader: ["diffusers_folder", "style_model_file", "clip_vision_file", "weight_dtype"],
    EditKitZImageLoader: ["diffusers_folder", "transformer_file", "text_encoder_file", "vae_file", "weight_dtype",
                          "compile"],
    EditKitFlux2Loader: ["diffusers_folder", "transformer_file", "text_encoder_file", "vae_file", "weight_dtype",
                         "compile"],
}


@pytest.mark.parametrize("node", DECLARED, ids=lambda n: n.__name__)
def test_validate_inputs_names_exactly_the_file_widgets(node):
    spec = inspect.getfullargspec(node.VALIDATE_INPUTS)
    assert spec.args[1:] == node.DECLARATION.file_widgets
    assert spec.varkw is None and spec.varargs is None
    assert "weight_dtype" not in spec.args


@pytest.mark.parametrize("node", DECLARED, ids=lambda n: n.__name__)
def test_inputs_keep_their_order_and_load_takes_them(node):
    types = node.INPUT_TYPES()
    required = types["required"]
    assert [*required, *types.get("optional", {})] == ORDER[node]
    assert list(inspect.signature(node.load).parameters)[1:] == ORDER[node]
    for name in node.DECLARATION.files:
        choices, options = required[name]
        assert choices[0] == "(from folder)" and options["tooltip"]


def test_kontext_loader_extends_the_flux_declaration():
    types = EditKitKontextInpaintLoader.INPUT_TYPES()
    assert [*types["required"], *types["optional"]] == [*ORDER[EditKitFluxLoader], "widen_init"]


def test_inputs_added_after_workflows_were_saved_are_optional():
    """API prompts saved before ``compile`` existed must still validate (ComfyUI rejects a missing required input)."""
    for node in DECLARED:
        if "compile" in ORDER[node]:
            assert "compile" in node.INPUT_TYPES()["optional"]
            assert inspect.signature(node.load).parameters["compile"].default == "auto"


def test_validate_and_is_changed_read_positional_and_keyword_values(tmp_path, monkeypatch):
    from editkit.nodes import comfy_bridge as bridge
    from editkit.nodes.family_loader import FileInput, LoaderDeclaration

    (tmp_path / "model.safetensors").write_bytes(b"not a model")
    monkeypatch.setattr(bridge, "model_path", lambda folder, name: tmp_path / name)
    monkeypatch.setattr(bridge, "folder_dirs", lambda folder: [tmp_path])
    node = declared_loader(LoaderDeclaration(files={"weights_file": FileInput("checkpoints", "tip", "a model")}))
    first = node.IS_CHANGED(weights_file="model.safetensors")
    assert first and first == node.IS_CHANGED("model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"another file, longer")
    assert node.IS_CHANGED(weights_file="model.safetensors") != first
    message = node.VALIDATE_INPUTS("model.safetensors")
    assert isinstance(message, str) and "weights_file" in message  # a broken file is named on the loader
    assert "missing.safetensors" in node.VALIDATE_INPUTS(weights_file="missing.safetensors")
