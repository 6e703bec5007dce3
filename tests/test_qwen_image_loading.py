"""Every Qwen-Image loading path gives the same model; wrong files and models give errors that name them."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from editkit.pipelines.core.errors import EditKitError, ModelFileError
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.qwen_image import loading, sizes
from editkit.pipelines.qwen_image.edit import edit
from editkit.pipelines.qwen_image.family import FAMILY
from editkit.pipelines.qwen_image.loading import (
    EDIT,
    EDIT_2509,
    EDIT_2511,
    QwenImageModel,
    transformer_source,
    vae_source,
)
from editkit.pipelines.qwen_image.text import text_encoder_source
from tiny.core import write_gguf
from tiny.qwen_image import FAMILY as QWEN
from tiny.qwen_image import transformer_2511

F32 = torch.float32
COMFY_TOKENIZER = [Path(os.environ.get("COMFYUI_ROOT", "/nonexistent")) / "comfy/text_encoders/qwen25_tokenizer",
                   Path(__file__).resolve().parents[2] / "shared/vendor/ComfyUI/comfy/text_encoders/qwen25_tokenizer"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return QWEN.tree(tmp_path_factory.mktemp("qwen_models"))["paths"]


@pytest.fixture(scope="module")
def components(paths):
    return QWEN.tree(paths["folder"].parents[1])["components"]


def _forward(component, seed=0):
    """One transformer call on fixed inputs: a 64x64 output plus one 64x64 reference, 9 text tokens."""
    g = torch.Generator().manual_seed(seed)
    config = component.module.config
    with torch.inference_mode():
        return component.module(
            hidden_states=torch.randn(1, 32, config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 9, config.joint_attention_dim, generator=g),
            timestep=torch.tensor([0.6]), img_shapes=[[(1, 4, 4), (1, 4, 4)]], return_dict=False,
        )[0]


def test_transformer_files_load_the_folder_weights(paths):
    folder = transformer_source(paths["folder"], None, F32).get()
    reference = folder.module.state_dict()
    for role in ("bf16", "fp8"):
        single = transformer_source(None, paths[role], F32).get()
        weights = single.module.state_dict()
        assert set(weights) == set(reference)
        # same values; the fp8 file's Linear weights stay fp8 in memory (issue 17), cast per call
        assert all(torch.equal(weights[k].float(), reference[k]) for k in reference), role
        assert (_forward(single) - _forward(folder)).abs().max() < 1e-5


def test_gguf_transformer_stays_quantized_and_is_close(paths):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    gguf = transformer_source(None, paths["gguf"], F32).get()
    assert gguf.quantized
    quantized = [p for p in gguf.module.parameters() if isinstance(p, GGUFParameter)]
    assert quantized and all(p.dtype == torch.uint8 for p in quantized)  # packed Q8_0 blocks, not dequantized
    dense = transformer_source(paths["folder"], None, F32).get()
    expected = _forward(dense)
    assert (_forward(gguf) - expected).abs().max() < 0.02 * expected.abs().max()


def test_vae_from_comfyui_file_equals_the_folder(paths):
    folder = vae_source(paths["folder"], None, F32).get()
    single = vae_source(None, paths["vae"], F32).get()
    a, b = folder.module.state_dict(), single.module.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoder_files_equal_the_folder(paths):
    from editkit.pipelines.qwen_image.sizes import vl_copy

    pictures = [vl_copy(torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(1)), 56, 56)]
    runtime = TorchRuntime("cpu")
    folder = text_encoder_source(paths["folder"], None, F32).get()
    expected = folder.encode("make it blue", pictures, EDIT_2509, runtime)
    for role in ("te_bf16", "te_fp8"):  # tokenizer from the folder, weights from ComfyUI's files
        single = text_encoder_source(paths["folder"], paths[role], F32).get()
        got = single.encode("make it blue", pictures, EDIT_2509, runtime)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-5, role


def test_single_text_encoder_with_comfyuis_bundled_tokenizer(paths):
    tokenizer_dir = next((p for p in COMFY_TOKENIZER if p.is_dir()), None)
    if tokenizer_dir is None:
        pytest.skip("ComfyUI's qwen25_tokenizer is not on this machine")
    encoder = text_encoder_source(None, paths["te_fp8"], F32, tokenizer_dir).get()
    states = encoder.encode("change the text GYM to FITNESS", [sizes.vl_copy(torch.rand(1, 3, 56, 56), 56, 56)],
                            EDIT_2509, TorchRuntime("cpu"))
    assert states.shape[0] == 1 and states.shape[-1] == 128 and torch.isfinite(states).all()


def _picture(seed: int) -> torch.Tensor:
    array = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def _edit_with(transformer, text, vae, folder):
    return edit(transformer, text, vae, [_picture(1), _picture(2)], "swap the jackets", TorchRuntime("cpu"),
                scheduler_config=FAMILY.scheduler_config(folder), steps=2, seed=3, true_cfg_scale=4.0,
                references=sizes.ReferenceSizes(sizes.NO_SHIFT, 56 * 56, 64 * 64)).images


def test_every_loading_path_gives_the_same_edit(paths):
    folder = paths["folder"]
    expected = _edit_with(transformer_source(folder, None, F32).get(), text_encoder_source(folder, None, F32).get(),
                          vae_source(folder, None, F32).get(), folder)
    singles = dict(text=text_encoder_source(folder, paths["te_fp8"], F32).get(), vae=vae_source(None, paths["vae"], F32).get())
    for role in ("bf16", "fp8"):
        got = _edit_with(transformer_source(None, paths[role], F32).get(), singles["text"], singles["vae"], None)
        assert (got - expected).abs().max() < 1e-5, role
    gguf = _edit_with(transformer_source(None, paths["gguf"], F32).get(), singles["text"], singles["vae"], None)
    assert (gguf - expected).abs().max() < 0.05  # Q8_0 rounding of every weight, through 2 steps and the VAE


def test_loaded_models_are_shared_while_in_use(paths):
    first = transformer_source(None, paths["bf16"], F32).get()
    assert transformer_source(None, paths["bf16"], F32).get() is first
    ref = weakref.ref(first.module)
    del first
    gc.collect()
    assert ref() is None  # nothing else keeps it: ComfyUI's "free memory" really frees


# --------------------------------------------------------------------------------------
# Which model it is


def test_variant_comes_from_the_folder_the_file_name_or_the_gguf_metadata(paths, tmp_path, caplog):
    assert loading.resolve_variant("auto", paths["folder"], None) == EDIT_2509
    assert loading.resolve_variant("auto", None, paths["gguf"]) == EDIT_2509  # general.name
    assert loading.detect_variant(None, paths["gguf"])[1] == "the file's metadata ('Qwen-Image-Edit-2509')"
    old = tmp_path / "qwen_image_edit_fp8_e4m3fn.safetensors"
    old.write_bytes(paths["fp8"].read_bytes())
    with caplog.at_level("INFO", logger="EditKit"):
        assert loading.resolve_variant("auto", None, old) == EDIT
    assert "original Qwen-Image-Edit" in caplog.text
    assert loading.resolve_variant(EDIT_2509, None, old) == EDIT_2509  # the widget wins
    unknown = tmp_path / "my_finetune.safetensors"
    unknown.write_bytes(paths["fp8"].read_bytes())
    assert loading.resolve_variant("auto", None, unknown) == EDIT_2509


# --------------------------------------------------------------------------------------
# Qwen-Image-Edit-2511: told by its weights in every loading path, by its name only as a fallback


@pytest.fixture(scope="module")
def folder_2511(paths, components, tmp_path_factory):
    """Qwen/Qwen-Image-Edit-2511's layout: the 2509 folder's files, a transformer config with zero_cond_t."""
    folder = tmp_path_factory.mktemp("diffusers") / "My-Edit"  # a name that says nothing
    folder.mkdir()
    for name in ("vae", "text_encoder", "tokenizer", "processor", "scheduler", "model_index.json"):
        (folder / name).symlink_to(paths["folder"] / name)
    transformer_2511(components).to(torch.bfloat16).save_pretrained(str(folder / "transformer"))
    return folder


def _is_2511(component) -> bool:
    return bool(component.module.config.zero_cond_t)


def test_2511_folder_is_told_by_its_transformer_config(paths, folder_2511):
    assert loading.detect_variant(folder_2511, None) == (EDIT_2511, "My-Edit/transformer/config.json (zero_cond_t)")
    assert loading.resolve_variant("auto", folder_2511, None) == EDIT_2511
    assert _is_2511(transformer_source(folder_2511, None, F32).get())
    assert loading.detect_variant(paths["folder"], None)[0] == EDIT_2509
    assert not _is_2511(transformer_source(paths["folder"], None, F32).get())
    forced = transformer_source(folder_2511, None, F32, variant=EDIT_2509).get()  # the widget wins
    assert not _is_2511(forced)


@pytest.mark.parametrize("role", ["bf16_2511", "fp8mixed_2511"])
def test_2511_single_files_are_told_by_comfyuis_marker_whatever_their_name(role, paths, tmp_path):
    renamed = tmp_path / "my_edit_model.safetensors"  # a name that says nothing
    renamed.write_bytes(paths[role].read_bytes())
    for file in (paths[role], renamed):
        assert loading.detect_variant(None, file) == (EDIT_2511, "the file's __index_timestep_zero__ tensor")
        assert loading.resolve_variant("auto", None, file) == EDIT_2511
    loaded = transformer_source(None, renamed, F32).get()
    assert _is_2511(loaded)
    reference = transformer_source(paths["folder"], None, F32).get().module.state_dict()
    weights = _effective_weights(loaded.module)  # the marker is not a weight; fp8mixed's scales are applied exactly
    assert set(weights) == set(reference) and all(torch.equal(weights[k], reference[k]) for k in reference)
    if role == "fp8mixed_2511":  # fp8 stays fp8 in memory, the scale applied at each call
        assert any(t.dtype == torch.float8_e4m3fn for t in loaded.module.state_dict().values())


def _effective_weights(module) -> dict:
    """The weights a forward computes with: fp8 ones cast up and multiplied by their layer's ``weight_scale``."""
    out = {}
    for key, tensor in module.state_dict().items():
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.float() * module.get_submodule(key.rsplit(".", 1)[0]).weight_scale
        out[key] = tensor
    return out


def test_2511_gguf_is_told_by_the_marker_or_else_by_its_name(paths, components, tmp_path):
    named = paths["gguf_2511"]  # unsloth's name, no marker, no general.name
    assert loading.detect_variant(None, named) == (EDIT_2511, "the file name 'qwen-image-edit-2511-Q8_0.gguf'")
    component = transformer_source(None, named, F32).get()
    assert component.quantized and _is_2511(component)
    marked = tmp_path / "edit-Q8_0.gguf"  # a converter that kept ComfyUI's marker
    write_gguf({**components["transformer"].state_dict(), "__index_timestep_zero__": torch.zeros(0)}, marked,
               arch="qwen_image")
    assert loading.detect_variant(None, marked) == (EDIT_2511, "the file's __index_timestep_zero__ tensor")
    component = transformer_source(None, marked, F32).get()
    assert component.quantized and _is_2511(component)
    assert not _is_2511(transformer_source(None, paths["gguf"], F32).get())  # the 2509 GGUF


def test_2511_name_is_the_fallback_and_the_widget_wins(paths, tmp_path):
    named = tmp_path / "qwen_image_edit_2511_bf16_from_somewhere.safetensors"  # 2509-like file, no marker
    named.write_bytes(paths["bf16"].read_bytes())
    assert loading.detect_variant(None, named) == (EDIT_2511, f"the file name '{named.name}'")
    assert _is_2511(transformer_source(None, named, F32).get())
    assert loading.variant_from_text("Qwen-Image-Edit-2511") == EDIT_2511
    assert loading.variant_from_text("qwen_image_edit_2509_bf16") == EDIT_2509
    assert not _is_2511(transformer_source(None, paths["bf16_2511"], F32, variant=EDIT_2509).get())
    assert _is_2511(transformer_source(None, paths["bf16"], F32, variant=EDIT_2511).get())
    for role in ("bf16", "fp8", "gguf"):  # every 2509 file stays 2509
        assert loading.detect_variant(None, paths[role])[0] == EDIT_2509
        assert not _is_2511(transformer_source(None, paths[role], F32).get())


def test_text_to_image_qwen_image_is_refused_naming_what_was_found(paths, tmp_path):
    t2i = tmp_path / "qwen_image_bf16.safetensors"
    t2i.write_bytes(paths["bf16"].read_bytes())
    model = QwenImageModel(transformer_source(None, t2i, F32), FAMILY.scheduler_config(None), "auto", None, t2i)
    with pytest.raises(EditKitError, match=r"Qwen-Image \(the text-to-image model\), found from the file name "
                                           r"'qwen_image_bf16.safetensors'"):
        _ = model.variant
    folder = tmp_path / "diffusers" / "Qwen-Image"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    with pytest.raises(EditKitError, match="Qwen-Image/model_index.json"):
        loading.resolve_variant("auto", folder, None)


def test_foreign_files_name_what_they_are(tiny_flux_files, tmp_path):
    flux, t5, ae = tiny_flux_files(tmp_path)
    with pytest.raises(ModelFileError, match="FLUX.1 transformer.*Flux Loader"):
        transformer_source(None, flux, F32).get()
    with pytest.raises(ModelFileError, match="T5 text encoder"):
        text_encoder_source(None, t5, F32, tmp_path).get()
    with pytest.raises(ModelFileError, match="2-D image VAE"):
        vae_source(None, ae, F32).get()


def test_text_only_qwen_without_vision_tower_is_refused(paths, tmp_path):
    sd = {k: v for k, v in load_file(str(paths["te_bf16"])).items() if not k.startswith("visual.")}
    path = tmp_path / "qwen_2.5_7b_text_only.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelFileError, match="without Qwen2.5-VL's vision tower"):
        text_encoder_source(paths["folder"], path, F32).get()


@pytest.fixture()
def tiny_flux_files():
    """Small files in FLUX.1's layouts (a few tensors each: enough for the loaders to recognise them)."""

    def make(root: Path):
        t = lambda: torch.zeros(4, 4)  # noqa: E731 (one tensor per key: safetensors refuses shared ones)
        flux = root / "flux1-dev.safetensors"
        save_file({"double_blocks.0.img_attn.qkv.weight": t(), "single_blocks.0.linear1.weight": t()}, str(flux))
        t5 = root / "t5xxl_fp16.safetensors"
        save_file({"shared.weight": t(), "encoder.block.0.layer.0.SelfAttention.q.weight": t()}, str(t5))
        ae = root / "ae.safetensors"
        save_file({"encoder.conv_in.weight": t(), "decoder.conv_out.weight": t(), "encoder.down.0.block.0.norm1.weight": t()},
                  str(ae))
        return flux, t5, ae

    return make


def test_shipped_configs_describe_the_real_models():
    transformer = loading._load_json(loading.CONFIG_DIR / "transformer" / "config.json")
    assert (transformer["num_layers"], transformer["num_attention_heads"], transformer["joint_attention_dim"]) == \
        (60, 24, 3584)
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"] == 128
    schedule = FAMILY.scheduler_config(None)
    assert schedule["shift_terminal"] == 0.02 and schedule["time_shift_type"] == "exponential"
