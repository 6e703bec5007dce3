"""Family components declared once (pipelines/core/family.py): folder identity, messages, refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

from editkit.pipelines.core.errors import EditKitError, ModelFileError
from editkit.pipelines.families import families
from editkit.pipelines.qwen_image import layered_loading

SPECS = list({spec.tag: spec for family in families().values() for spec in (family.transformer, family.vae)}.values())


def _folder(tmp_path, sub: str, class_name: str):
    folder = tmp_path / "Model"
    (folder / sub).mkdir(parents=True)
    (folder / sub / "config.json").write_text(json.dumps({"_class_name": class_name}))
    (folder / sub / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 16)
    return folder


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_replacing_a_folders_weights_is_a_new_model(tmp_path, spec):
    """Identity covers the weight shards, not only config.json (a replaced shard must not reuse the old model)."""
    folder = _folder(tmp_path, spec.subfolder, spec.model_class)
    before = spec.source(folder, None, torch.float32).key
    weights = folder / spec.subfolder / "diffusion_pytorch_model.safetensors"
    stat = (folder / spec.subfolder / "config.json").stat()
    weights.write_bytes(b"y" * 32)
    os.utime(folder / spec.subfolder / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert spec.source(folder, None, torch.float32).key != before
    assert spec.source(folder, None, torch.float32).key == spec.source(folder, None, torch.float32).key


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_a_folder_of_another_class_is_refused_by_name(tmp_path, spec):
    folder = _folder(tmp_path, spec.subfolder, "SomethingElse2DModel")
    with pytest.raises(ModelFileError, match=f"holds a SomethingElse2DModel, not a {spec.what}"):
        spec.source(folder, None, torch.float32).get()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_nothing_chosen_names_the_loader(spec):
    with pytest.raises(EditKitError, match="EditKit · .*Loader"):
        spec.source(None, None, torch.float32).get()


def test_layered_refuses_an_edit_transformer_folder(tmp_path):
    folder = _folder(tmp_path, "transformer", "QwenImageTransformer2DModel")
    with pytest.raises(ModelFileError, match="Layered"):
        layered_loading.TRANSFORMER.source(folder, None, torch.float32).get()
