"""A diffusers folder's model is identified by its weight files, not only its config (issue 17, fault 7).

Models are shared while anything uses them (core.loading.shared). Replacing a folder's weight shards
under an unchanged ``config.json`` (a newer checkpoint copied over the old one) must load the new weights:
the model already in memory must not be reused.
"""

from __future__ import annotations

import os
import shutil

import pytest
import safetensors.torch
import torch

from editkit.pipelines.core.loading import folder_key
from editkit.pipelines.flux import loading as flux_loading
from editkit.pipelines.qwen_image import layered_loading as qwen_layered_loading
from editkit.pipelines.qwen_image import loading as qwen_loading
from editkit.pipelines.zimage import loading as zimage_loading

SOURCES = {  # (folder name in the tiny tree, sub-folder, the family's source function)
    "flux_transformer": ("FLUX.1-Fill-dev", "transformer", flux_loading.transformer_source),
    "flux_vae": ("FLUX.1-Fill-dev", "vae", flux_loading.vae_source),
    "zimage_transformer": ("Z-Image-Turbo", "transformer", zimage_loading.transformer_source),
    "qwen_transformer": ("Qwen-Image-Edit-2509", "transformer", qwen_loading.transformer_source),
    "qwen_vae": ("Qwen-Image-Edit-2509", "vae", qwen_loading.vae_source),
    "qwen_layered_transformer": ("Qwen-Image-Layered", "transformer", qwen_layered_loading.transformer_source),
}


def _rewrite_shards(sub) -> None:
    """Every weight shard of ``sub`` gets other values (+1), same names, shapes and dtypes; the config and its
    modification time are left exactly as they were."""
    config = sub / "config.json"
    stat = config.stat()
    shards = sorted(sub.glob("*.safetensors"))
    assert shards, f"no weight shards in {sub}"
    for shard in shards:
        sd = safetensors.torch.load_file(str(shard))
        safetensors.torch.save_file({k: (v.float() + 1).to(v.dtype) if v.is_floating_point() else v
                                     for k, v in sd.items()}, str(shard))
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_replaced_shards_load_again(name, tiny_models, tmp_path):
    folder_name, sub, source = SOURCES[name]
    folder = tmp_path / folder_name
    shutil.copytree(tiny_models / "diffusers" / folder_name, folder)
    first = source(folder, None, torch.float32).get()  # kept alive: shared while in use
    before = {k: v.clone() for k, v in first.module.state_dict().items()}
    _rewrite_shards(folder / sub)
    second = source(folder, None, torch.float32).get()
    assert second is not first, "the model loaded from the old shards was reused"
    changed = [k for k, v in second.module.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "the new model does not hold the new weights"
    assert source(folder, None, torch.float32).get() is second  # unchanged files: shared, not loaded again


def test_folder_key_covers_weights_not_hidden_files(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    (tmp_path / "transformer" / "model.safetensors").write_bytes(b"1234")
    key = folder_key(tmp_path, "transformer")
    (tmp_path / "transformer" / ".cache").mkdir()  # huggingface-cli's download metadata
    (tmp_path / "transformer" / ".cache" / "x.lock").write_text("")
    assert folder_key(tmp_path, "transformer") == key
    (tmp_path / "transformer" / "model.safetensors").write_bytes(b"123456")
    assert folder_key(tmp_path, "transformer") != key
    assert folder_key(None) == (None,)
