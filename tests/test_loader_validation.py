"""Loaders check their file choices when a prompt is queued (VALIDATE_INPUTS), not when a sampler first uses them.

* A missing file or folder gets EditKit's message (the folder looked in, what belongs there, where to get it)
  instead of ComfyUI's "Value not in list"; ComfyUI really hands the check to the loader (real executor test).
* A file cut short (safetensors, GGUF, .pth), a Git LFS pointer, or a diffusers folder without its weights is
  "incomplete or damaged", with the file's name and its byte count; expected weight names come from the
  folder's own index/model_index.json (never a ``.bin`` nobody expected).

The byte counts the tests expect are computed independently of EditKit's parser (from the whole file's size,
or gguf-py's own reader), so a wrong extent calculation fails here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from editkit.nodes import comfy_bridge
from editkit.nodes.ben2_nodes import EditKitBEN2Loader
from editkit.nodes.flux_nodes import EditKitFluxLoader
from editkit.nodes.kontext_nodes import EditKitKontextInpaintLoader
from editkit.nodes.lora_nodes import EditKitFluxLora
from editkit.nodes.qwen_image_nodes import EditKitQwenImageLoader
from editkit.nodes.qwen_layered_nodes import EditKitQwenImageLayeredLoader
from editkit.nodes.redux_nodes import EditKitReduxLoader
from editkit.nodes.zimage_nodes import EditKitZImageLoader
from editkit.pipelines.core import integrity
from packload import ROOT

FROM = "(from folder)"
NONE = "(none)"
MODELS = json.loads((ROOT / "workflows" / "notes" / "models.json").read_text(encoding="utf-8"))["models"]


def _safetensors(path: Path, shapes=((64, 32), (16,))) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"w{i}": np.ones(shape, np.float32) for i, shape in enumerate(shapes)}, str(path))
    return path


def _gguf(path: Path) -> Path:
    from tiny.core import write_gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf({"double_blocks.0.img_attn.qkv.weight": torch.ones(96, 64), "img_in.bias": torch.ones(40)}, path)
    return path


def _gguf_end(path: Path) -> int:
    """Where a GGUF's last tensor ends, as gguf-py reads it (the writer may pad the file beyond it)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)


def _cut(path: Path, keep: int) -> int:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(keep)
    return size


# --------------------------------------------------------------------------------------------------------------
# Single files


def test_whole_files_pass(tmp_path):
    assert integrity.file_damage(_safetensors(tmp_path / "a.safetensors")) is None
    assert integrity.file_damage(_gguf(tmp_path / "a.gguf")) is None
    pth = tmp_path / "a.pth"
    torch.save({"w": torch.ones(8, 8)}, pth)
    assert integrity.file_damage(pth) is None


def test_cut_safetensors_says_how_many_bytes_of_how_many(tmp_path):
    path = _safetensors(tmp_path / "flux1-dev.safetensors")
    whole = _cut(path, path.stat().st_size - 1000)
    assert integrity.file_damage(path) == f"incomplete or damaged: {whole - 1000:,} of {whole:,} bytes"
    _cut(path, 20)  # inside the JSON header
    assert integrity.file_damage(path) == "incomplete or damaged: 20 bytes, cut off inside its header"
    _cut(path, 3)
    assert integrity.file_damage(path) == "incomplete or damaged: 3 bytes, cut off inside its header"


def test_longer_safetensors_and_foreign_bytes_are_damaged(tmp_path):
    path = _safetensors(tmp_path / "x.safetensors")
    size = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b"\0" * 10)
    assert integrity.file_damage(path) == f"damaged: {size + 10:,} bytes where its header describes {size:,} bytes"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    assert "not a safetensors file" in integrity.file_damage(path)


def test_cut_gguf_counts_bytes_up_to_the_last_tensor(tmp_path):
    path = _gguf(tmp_path / "flux1-fill-dev-Q8_0.gguf")
    end = _gguf_end(path)  # gguf-py's own reading of the file
    _cut(path, end - 1)
    assert integrity.file_damage(path) == f"incomplete or damaged: {end - 1:,} of {end:,} bytes"
    _cut(path, 40)
    assert integrity.file_damage(path) == "incomplete or damaged: 40 bytes, cut off inside its header"


def test_cut_pth_lfs_pointer_and_empty_file(tmp_path):
    pth = tmp_path / "BEN2_Base.pth"
    torch.save({"w": torch.ones(64, 64)}, pth)
    size = _cut(pth, pth.stat().st_size // 2)
    assert integrity.file_damage(pth).startswith(f"incomplete or damaged: {size // 2:,} bytes, its zip end record")
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234\n")
    assert integrity.file_damage(pointer).startswith("a Git LFS pointer (")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert integrity.file_damage(empty) == "empty: 0 bytes"


def test_result_follows_the_file_not_a_stale_cache(tmp_path):
    path = _safetensors(tmp_path / "a.safetensors")
    assert integrity.file_damage(path) is None
    _cut(path, path.stat().st_size - 1)
    os.utime(path, ns=(1, 1))  # same size as nothing before, another mtime: a new cache key
    assert integrity.file_damage(path) is not None


# --------------------------------------------------------------------------------------------------------------
# Diffusers folders


def _diffusers_folder(root: Path, name: str = "FLUX.1-Fill-dev") -> Path:
    """A FLUX.1-like folder: a diffusers transformer in two shards, a one-file VAE, two transformers encoders."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxFillPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "scheduler": ["diffusers", "X"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}))
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        (folder / component).mkdir()
        (folder / component / "config.json").write_text("{}")
    shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for shard in shards:
        _safetensors(folder / "transformer" / shard)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    _safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors")
    _safetensors(folder / "text_encoder" / "model.safetensors")
    _safetensors(folder / "text_encoder_2" / "model.safetensors")
    return folder


COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def test_whole_folder_passes(tmp_path):
    assert integrity.folder_damage(_diffusers_folder(tmp_path), COMPONENTS) == []


def test_folder_names_the_missing_shard_and_the_library_file_never_a_bin(tmp_path):
    folder = _diffusers_folder(tmp_path)
    (folder / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    found = {d.path.relative_to(folder).as_posix(): d.problem for d in integrity.folder_damage(folder, COMPONENTS)}
    assert found == {
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors":
            "missing, expected by diffusion_pytorch_model.safetensors.index.json",
        "text_encoder_2/model.safetensors": "missing, expected by a transformers model folder",
    }


def test_folder_reports_a_cut_shard_and_a_missing_component(tmp_path):
    folder = _diffusers_folder(tmp_path)
    shard = folder / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    whole = shard.stat().st_size
    _cut(shard, whole - 100)
    shutil.rmtree(folder / "vae")
    found = {d.path.relative_to(folder).as_posix(): d.problem for d in integrity.folder_damage(folder, COMPONENTS)}
    assert found == {shard.relative_to(folder).as_posix(): f"incomplete or damaged: {whole - 100:,} of {whole:,} bytes",
                     "vae": "missing: model_index.json lists this component"}
    # Only the components a loader reads are checked (a file widget replaces the folder's transformer).
    assert [d.path.name for d in integrity.folder_damage(folder, ("text_encoder",))] == []


# --------------------------------------------------------------------------------------------------------------
# Loader nodes (VALIDATE_INPUTS), without ComfyUI: the models folder is a temporary tree


@pytest.fixture()
def models(tmp_path):
    comfy_bridge.set_models_root(tmp_path)
    yield tmp_path
    comfy_bridge.set_models_root(None)


def _outpaint_choice(**changes):
    choice = dict(diffusers_folder="FLUX.1-Fill-dev", transformer_file="flux1-fill-dev-Q8_0.gguf",
                  vae_file="ae.safetensors", clip_l_file=FROM, t5_file=FROM)
    return {**choice, **changes}


def test_missing_files_name_the_folder_what_belongs_there_and_where_to_get_it(models):
    message = EditKitFluxLoader.VALIDATE_INPUTS(**_outpaint_choice())
    assert isinstance(message, str)
    assert (f"diffusers_folder 'FLUX.1-Fill-dev' is not in {models / 'diffusers'}: download every file of Hugging "
            f"Face black-forest-labs/FLUX.1-Fill-dev into {models / 'diffusers' / 'FLUX.1-Fill-dev'}, or choose "
            "(none) and pick single files.") in message
    assert (f"transformer_file 'flux1-fill-dev-Q8_0.gguf' is not in {models / 'diffusion_models'} (or 1 other "
            f"diffusion_models folder): download {MODELS['flux1-fill-dev-Q8_0.gguf']['url']} into it, or pick "
            "another file.") in message
    assert (f"vae_file 'ae.safetensors' is not in {models / 'vae'}: download {MODELS['ae.safetensors']['url']} "
            "into it, or pick another file.") in message
    assert "Value not in list" not in message


def test_whole_choices_pass_and_damaged_ones_name_file_and_bytes(models):
    _diffusers_folder(models / "diffusers")
    gguf = _gguf(models / "diffusion_models" / "flux1-fill-dev-Q8_0.gguf")
    _safetensors(models / "vae" / "ae.safetensors")
    assert EditKitFluxLoader.VALIDATE_INPUTS(**_outpaint_choice()) is True
    assert EditKitKontextInpaintLoader.VALIDATE_INPUTS(**_outpaint_choice()) is True
    whole = _gguf_end(gguf)
    _cut(gguf, 1000)
    message = EditKitFluxLoader.VALIDATE_INPUTS(**_outpaint_choice())
    assert message == (f"transformer_file: {gguf} is incomplete or damaged: 1,000 of {whole:,} bytes; download it "
                       f"again from {MODELS['flux1-fill-dev-Q8_0.gguf']['url']}.")


def test_folder_components_replaced_by_files_are_not_required(models):
    folder = _diffusers_folder(models / "diffusers")
    shutil.rmtree(folder / "transformer")  # the GGUF replaces it
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    _gguf(models / "diffusion_models" / "flux1-fill-dev-Q8_0.gguf")
    _safetensors(models / "vae" / "ae.safetensors")
    message = EditKitFluxLoader.VALIDATE_INPUTS(**_outpaint_choice())
    assert message == ("diffusers_folder 'FLUX.1-Fill-dev': text_encoder_2/model.safetensors is missing, expected by "
                       "a transformers model folder; download it again from Hugging Face "
                       "black-forest-labs/FLUX.1-Fill-dev.")
    _safetensors(models / "text_encoders" / "t5.safetensors")
    assert EditKitFluxLoader.VALIDATE_INPUTS(**_outpaint_choice(t5_file="t5.safetensors")) is True


def test_every_loader_checks_its_files(models):
    calls = [
        (EditKitQwenImageLoader, dict(diffusers_folder="Qwen-Image-Edit-2509", transformer_file=FROM,
                                      text_encoder_file=FROM, vae_file=FROM), "Qwen/Qwen-Image-Edit-2509"),
        (EditKitQwenImageLayeredLoader, dict(diffusers_folder="Qwen-Image-Layered", transformer_file=FROM,
                                             text_encoder_file=FROM, vae_file=FROM), "Qwen/Qwen-Image-Layered"),
        (EditKitZImageLoader, dict(diffusers_folder=NONE, transformer_file="z_image_turbo_bf16.safetensors",
                                   text_encoder_file="qwen_3_4b.safetensors", vae_file=FROM),
         MODELS["qwen_3_4b.safetensors"]["url"]),
        (EditKitReduxLoader, dict(diffusers_folder=NONE, style_model_file="flux1-redux-dev.safetensors",
                                  clip_vision_file="sigclip_vision_patch14_384.safetensors"),
         MODELS["sigclip_vision_patch14_384.safetensors"]["url"]),
        (EditKitBEN2Loader, dict(model_name="BEN2_Base.safetensors"), MODELS["BEN2_Base.safetensors"]["url"]),
        (EditKitFluxLora, dict(lora_name="my_style.safetensors"), "put a FLUX.1 LoRA (.safetensors) there"),
    ]
    for node, choice, hint in calls:
        message = node.VALIDATE_INPUTS(**choice)
        assert isinstance(message, str) and f"is not in {models}/" in message and hint in message, node


def test_no_folder_and_from_folder_is_left_to_the_model_user(models):
    """(none) + (from folder) selects nothing: the loader's lazy handle explains it when an output is used
    (e.g. FLUX.1-dev for Redux without text encoders: the encoders are never used)."""
    _safetensors(models / "diffusion_models" / "flux1-dev.safetensors")
    _safetensors(models / "vae" / "ae.safetensors")
    assert EditKitFluxLoader.VALIDATE_INPUTS(NONE, "flux1-dev.safetensors", "ae.safetensors", FROM, FROM) is True


# --------------------------------------------------------------------------------------------------------------
# Defaults and the Layered/Edit mix-up (fault item 5)


def _index(folder: Path, cls: str) -> None:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))


def test_new_loaders_never_default_to_another_models_folder(models):
    _index(models / "diffusers" / "Qwen-Image-Layered", "QwenImageLayeredPipeline")
    _index(models / "diffusers" / "FLUX.1-Redux-dev", "FluxPriorReduxPipeline")
    default = lambda node: node.INPUT_TYPES()["required"]["diffusers_folder"][1]["default"]  # noqa: E731
    assert default(EditKitQwenImageLoader) == NONE
    assert default(EditKitFluxLoader) == NONE
    _index(models / "diffusers" / "My-Edit", "QwenImageEditPlusPipeline")
    _index(models / "diffusers" / "A-Flux-dev", "FluxPipeline")
    _index(models / "diffusers" / "Z-Fill", "FluxFillPipeline")
    assert default(EditKitQwenImageLoader) == "My-Edit"
    assert default(EditKitFluxLoader) == "Z-Fill"  # Fill first: inpaint, outpaint and Kontext-inpaint need it
    assert default(EditKitQwenImageLayeredLoader) == "Qwen-Image-Layered"


def test_layered_folder_in_the_edit_loader_is_called_layered(models):
    from editkit.pipelines.core.errors import EditKitError
    from editkit.pipelines.qwen_image import loading

    folder = models / "diffusers" / "Some-Folder"
    _index(folder, "QwenImageLayeredPipeline")
    with pytest.raises(EditKitError) as caught:
        loading.resolve_variant("auto", folder, None)
    message = str(caught.value)
    assert message.startswith("This is Qwen-Image-Layered (it splits a picture into transparent layers), found from "
                              "Some-Folder/model_index.json, not an edit model: load it with EditKit · "
                              "Qwen-Image-Layered Loader.")
    assert "text-to-image" not in message
    with pytest.raises(EditKitError, match="This is Qwen-Image-Layered"):
        loading.resolve_variant("auto", None, models / "qwen_image_layered_bf16.safetensors")


# --------------------------------------------------------------------------------------------------------------
# In ComfyUI's real executor: the loader's message replaces "Value not in list", on the loader node


def test_comfyui_reports_the_loader_message_at_queue_time(comfyui, tmp_path):
    api = json.loads((ROOT / "workflows" / "api" / "flux_fill_outpaint.json").read_text(encoding="utf-8"))
    loader = next(i for i, n in api.items() if n["class_type"] == "EditKitFluxLoader")
    api[loader]["inputs"]["transformer_file"] = "flux1-fill-dev-Q4_K_S.gguf"
    ok, _error, _outputs, node_errors = comfyui.validate(api)
    assert not ok and set(node_errors) == {loader}
    errors = node_errors[loader]["errors"]
    assert {e["type"] for e in errors} == {"custom_validation_failed"}
    folder = Path(comfyui.folder_paths.get_folder_paths("diffusion_models")[0])
    assert all(f"transformer_file 'flux1-fill-dev-Q4_K_S.gguf' is not in {folder}" in e["details"] for e in errors)

    # A cut-off copy of the tiny GGUF is blamed on the loader, with its byte count.
    broken = folder / "editkit-test-cut.gguf"
    shutil.copyfile(folder / "flux1-fill-dev-Q8_0.gguf", broken)
    try:
        whole = _gguf_end(broken)
        _cut(broken, 4096)
        api[loader]["inputs"]["transformer_file"] = broken.name
        ok, _error, _outputs, node_errors = comfyui.validate(api)
        assert not ok and set(node_errors) == {loader}
        assert f"is incomplete or damaged: 4,096 of {whole:,} bytes" in node_errors[loader]["errors"][0]["details"]
    finally:
        broken.unlink()


# --------------------------------------------------------------------------------------------------------------
# Empty batches (fault item 4): the message names the input and a fix that fits an empty batch


class _Unused:
    """A model handle the checks must not reach: the batch is refused before any model is used."""

    def get(self):
        raise AssertionError("a model was used before the inputs were checked")

    variant = "Qwen-Image-Edit-2509"


def _edit(**pictures):
    from editkit.nodes.qwen_image_nodes import EditKitQwenImageEdit
    from node_calls import call_node

    pictures.setdefault("image", torch.rand(1, 32, 32, 3))
    return call_node(EditKitQwenImageEdit, model=_Unused(), text_encoder=_Unused(), vae=_Unused(),
                     prompt="make it red", **pictures)


@pytest.mark.parametrize("name", ["image", "image3"])
def test_empty_image_batch_names_the_input_and_does_not_suggest_splitting(name):
    from editkit.pipelines.core.errors import EditKitError

    with pytest.raises(EditKitError) as caught:
        _edit(**{name: torch.zeros(0, 32, 32, 3)})
    message = str(caught.value)
    assert message.startswith(f"'{name}' got an empty batch (no picture)")
    assert f"Connect a picture (e.g. Load Image) to '{name}'" in message and "ImageFromBatch" not in message


def test_empty_references_batch_names_references():
    from editkit.pipelines.core.errors import EditKitError

    with pytest.raises(EditKitError) as caught:
        _edit(references=torch.zeros(0, 32, 32, 3))
    message = str(caught.value)
    assert message.startswith("'references' got an empty batch (no picture)") and "disconnect 'references'" in message
    assert "Picture 2" not in message
