"""VAE single files read by the shared single-file reader (``pipelines/core/single_file.py``, ``kind="vae"``).

FLUX.1's VAE is checked against diffusers' own ``AutoencoderKL.from_single_file`` (what EditKit built it with
before); the FLUX.2, Qwen-Image and Layered VAEs against the module the file was written from, in both dtypes.
"""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import safetensors.torch
import torch

from editkit.pipelines.core.errors import ModelFileError
from editkit.pipelines.flux import loading as flux_loading
from editkit.pipelines.flux2 import loading as flux2_loading
from editkit.pipelines.qwen_image import layered_loading
from editkit.pipelines.qwen_image import loading as qwen_loading
from tiny import flux1, flux2, qwen_image, qwen_layered
from tiny.core import save

F32, BF16, FP8 = torch.float32, torch.bfloat16, torch.float8_e4m3fn

# family: (tiny family, how its file lays the keys out, the loader's VAE source)
FAMILIES = {
    "flux1": (flux1.FAMILY, flux1.bfl_vae, flux_loading.vae_source),
    "flux2": (flux2.FAMILY, flux2.vae_to_ldm, flux2_loading.vae_source),
    "qwen": (qwen_image.FAMILY, qwen_image.vae_to_wan, qwen_loading.vae_source),
    "layered": (qwen_layered.FAMILY, qwen_image.vae_to_wan, layered_loading.vae_source),
}


@pytest.fixture(scope="module")
def vaes():
    return {name: family.build("vae") for name, (family, _, _) in FAMILIES.items()}


def _write(tmp_path: Path, name: str, sd: dict, dtype=None) -> Path:
    path = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.safetensors"  # a new file: never a cached model
    save(sd, path, dtype)
    return path


def _assert_same_state(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    a, b = ours.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_flux1_vae_file_equals_diffusers_from_single_file(tmp_path, vaes, dtype):
    """BFL's ae.safetensors layout: the same tensors and decode as diffusers' own single-file loader."""
    from diffusers import AutoencoderKL

    vae = vaes["flux1"]
    vae.save_pretrained(str(tmp_path / "folder" / "vae"))
    path = _write(tmp_path, "ae", flux1.bfl_vae(vae.state_dict()))
    reference = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "folder"), subfolder="vae",
                                               torch_dtype=dtype, local_files_only=True)
    ours = flux_loading.vae_source(None, path, dtype).get()
    assert ours.kind == "vae" and ours.dtype == dtype
    _assert_same_state(ours.module, reference)
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours.module.decode(latent).sample, reference.decode(latent).sample)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["flux2", "qwen", "layered"])
def test_vae_files_equal_the_module_they_were_written_from(tmp_path, vaes, name, dtype):
    _, layout, source = FAMILIES[name]
    vae = vaes[name]
    path = _write(tmp_path, name, layout(vae.state_dict()))  # float32, in the layout users download
    ours = source(None, path, dtype).get()
    _assert_same_state(ours.module, copy.deepcopy(vae).to(dtype))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_vae_files_are_assigned_not_copied(tmp_path, monkeypatch, vaes, name):
    """Built on the meta device, the model takes the file's tensors: loaded in the file's dtype, nothing is copied."""
    _, layout, source = FAMILIES[name]
    path = _write(tmp_path, name, layout(vaes[name].state_dict()), BF16)
    read, load_file = [], safetensors.torch.load_file

    def spy(*args, **kwargs):
        tensors = load_file(*args, **kwargs)
        read.extend(tensors.values())
        return tensors

    monkeypatch.setattr(safetensors.torch, "load_file", spy)
    gc.collect()
    module = source(None, path, BF16).get().module
    storages = {t.untyped_storage().data_ptr() for t in read}
    params = list(module.parameters())
    assert params and all(p.untyped_storage().data_ptr() in storages for p in params)


def _fp8(sd: dict, scale_key: str) -> tuple[dict, dict]:
    """``sd`` with its convolution and linear weights stored as scaled float8, and the dense weights they stand for."""
    stored, dense = {}, {}
    for key, tensor in sd.items():
        if key.endswith(".weight") and tensor.ndim >= 2:
            scale = tensor.abs().max().float() / 448
            stored[key] = (tensor.float() / scale).to(FP8)
            stored[key[: -len("weight")] + scale_key] = scale
            dense[key] = stored[key].float() * scale
        else:
            stored[key] = dense[key] = tensor
    return stored, dense


def test_scaled_fp8_flux1_vae_is_widened_with_its_scales(tmp_path, vaes):
    """ComfyUI's scaled fp8 in BFL's layout: the scales follow diffusers' key conversion (attention 1x1 convs too)."""
    from diffusers import AutoencoderKL

    vaes["flux1"].save_pretrained(str(tmp_path / "folder" / "vae"))
    stored, dense = _fp8(flux1.bfl_vae(vaes["flux1"].state_dict()), "scale_weight")
    path = _write(tmp_path, "ae_fp8", {**stored, "scaled_fp8": torch.zeros(0, dtype=FP8)})
    reference = AutoencoderKL.from_single_file(str(_write(tmp_path, "ae_dense", dense)), config=str(tmp_path / "folder"),
                                               subfolder="vae", torch_dtype=F32, local_files_only=True)
    ours = flux_loading.vae_source(None, path, F32).get().module
    _assert_same_state(ours, reference)


def test_fp8mixed_qwen_vae_is_widened_with_its_scales(tmp_path, vaes):
    """Comfy-Org's fp8mixed convention (a float32 ``weight_scale`` per fp8 tensor), diffusers' key layout."""
    stored, dense = _fp8(vaes["qwen"].state_dict(), "weight_scale")
    path = _write(tmp_path, "qwen_fp8mixed", stored)
    reference = copy.deepcopy(vaes["qwen"])
    reference.load_state_dict(dense)
    ours = qwen_loading.vae_source(None, path, BF16).get()
    _assert_same_state(ours.module, reference.to(BF16))


def test_a_missing_tensor_is_named_once(tmp_path, vaes):
    """The reader's own message is not wrapped in a second "Weights do not fit" (it was, for transformers)."""
    sd = flux1.bfl_vae(vaes["flux1"].state_dict())
    del sd["decoder.mid.block_1.conv1.weight"]
    with pytest.raises(ModelFileError, match=r"Not the FLUX.1 VAE: 1 tensors missing, e.g. "
                                             r"\['decoder.mid_block.resnets.0.conv1.weight'\]") as info:
        flux_loading.vae_source(None, _write(tmp_path, "ae_cut", sd), F32).get()
    assert str(info.value).count("Expected") == 1 and "Weights do not fit" not in str(info.value)

    sd = flux1.FAMILY.build("transformer").state_dict()  # diffusers' layout: no converter that needs every key
    del sd["transformer_blocks.0.attn.norm_k.weight"]
    with pytest.raises(ModelFileError, match="Not a complete FLUX.1 transformer: 1 tensors missing") as info:
        flux_loading.transformer_source(None, _write(tmp_path, "fill_cut", sd), F32).get()
    assert str(info.value).count("Expected") == 1 and "Weights do not fit" not in str(info.value)


def test_an_rgba_vae_in_the_rgb_loader_says_what_it_is(tmp_path, vaes):
    path = _write(tmp_path, "qwen_image_layered_vae", qwen_image.vae_to_wan(vaes["layered"].state_dict()))
    with pytest.raises(ModelFileError, match="A VAE with 4 image channels .*Qwen-Image-Layered Loader"):
        qwen_loading.vae_source(None, path, F32).get()


@pytest.mark.parametrize(("name", "message"), [
    ("flux1", "A VAE with 32 latent channels \\(not FLUX.1's 16\\)"),
    ("flux2", "This is the FLUX.1 VAE \\(ae.safetensors\\): it has no latent batch-norm statistics"),
    ("qwen", "This is a 2-D image VAE \\(FLUX.1 / SD style\\), not Qwen-Image's"),
    ("layered", "This is a 2-D image VAE \\(FLUX.1 / SD style\\), not Qwen-Image-Layered's"),
])
def test_another_familys_vae_is_refused_by_what_it_is(tmp_path, vaes, name, message):
    other = {"flux1": ("flux2", flux2.vae_to_ldm)}.get(name, ("flux1", flux1.bfl_vae))
    path = _write(tmp_path, other[0], other[1](vaes[other[0]].state_dict()))
    with pytest.raises(ModelFileError, match=message):
        FAMILIES[name][2](None, path, F32).get()


def test_a_file_of_no_vae_is_refused(tmp_path):
    path = _write(tmp_path, "clip_l", {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)})
    for _, _, source in FAMILIES.values():
        with pytest.raises(ModelFileError, match="Not a VAE \\(found keys like text_model"):
            source(None, path, F32).get()
