"""Qwen-Image-Layered decomposition equals diffusers' reference pipeline, loads every file form, and refuses bad input.

Parity runs diffusers' ``QwenImageLayeredPipeline`` on the same tiny weights (tests/tiny/qwen_layered.py)
with its resolution bucket patched from 640² to 64² pixels for speed (EditKit runs ``resolution=64``, the
same rule); the noise is the CPU ``torch.randn`` of the unpacked latent shape ``[1, layers+1, 16, h, w]``
from the seed in both.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.nodes import qwen_layered_nodes
from editkit.pipelines.core.errors import EditKitError, ModelFileError
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.qwen_image import layered_loading as loading
from editkit.pipelines.qwen_image.family import FAMILY
from editkit.pipelines.qwen_image.layered import bucket_size, decompose
from editkit.pipelines.qwen_image.loading import transformer_source as edit_transformer_source
from editkit.pipelines.qwen_image.loading import vae_source as edit_vae_source
from editkit.pipelines.qwen_image.text import text_encoder_source
from tiny.qwen_image import FAMILY as QWEN
from tiny.qwen_layered import FAMILY as LAYERED
from tiny.qwen_layered import FILES, reference_pipeline

F32 = torch.float32
SMALL = 64  # the test bucket: 64² pixels instead of 640²
TOL = 1e-5


def _real_bucket():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions

    return calculate_dimensions


REAL_BUCKET = _real_bucket()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return LAYERED.tree(tmp_path_factory.mktemp("layered_models"))


def _text(folder, file=None):
    return loading.CaptioningTextEncoder(text_encoder_source(folder, file, F32),
                                         loading.caption_head_source(folder, file))


@pytest.fixture(scope="module")
def models(tree):
    folder = tree["paths"]["folder"]
    return dict(transformer=loading.transformer_source(folder, None, F32).get(),
                vae=loading.vae_source(folder, None, F32).get(), text=_text(folder),
                schedule=FAMILY.scheduler_config(folder))


def rgba_picture(width: int, height: int, seed: int, transparent: bool = True):
    """A random 8-bit RGBA picture as PIL (for diffusers) and as a ``[1,4,H,W]`` 0..1 tensor (for EditKit)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    array[..., 3] = 255
    if transparent:
        array[: height // 3, : width // 2, 3] = 0
    return Image.fromarray(array, "RGBA"), torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def run_decompose(models, picture, **kwargs):
    kwargs.setdefault("steps", 3)  # 3: with 2 steps the terminal stretch makes every shift give [1, 0.02]
    kwargs.setdefault("seed", 11)
    kwargs.setdefault("resolution", SMALL)
    text = models["text"]
    return decompose(models["transformer"], text, models["vae"], picture, TorchRuntime("cpu"),
                     scheduler_config=models["schedule"], caption_head=text.caption_head(), **kwargs)


def small_bucket(area, ratio):
    """diffusers' bucket rule, applied to 64² instead of the 640² or 1024² its pipeline asserts."""
    return REAL_BUCKET(SMALL * SMALL, ratio)


def reference_layers(tree, pil, **kwargs):
    """Layers from diffusers' pipeline as ``[layers,4,H,W]`` float, and the pipeline's caption if it wrote one."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as layered

    pipe = reference_pipeline(tree["components"])
    captions = []
    real_caption = pipe.get_image_caption

    def recording_caption(*args, **kw):
        captions.append(real_caption(*args, **kw))
        return captions[-1]

    seed = kwargs.pop("seed", 11)
    with mock.patch.object(layered, "calculate_dimensions", small_bucket), \
            mock.patch.object(pipe, "get_image_caption", recording_caption):
        out = pipe(image=pil, num_inference_steps=kwargs.pop("steps", 3), resolution=640,
                   generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    layers = torch.from_numpy(np.asarray(out.images[0])).permute(0, 3, 1, 2)
    return layers, (captions[0] if captions else None)


# --------------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("cfg, normalize, size, layers", [(4.0, True, (80, 48), 3), (2.5, False, (48, 64), 2)])
def test_layers_equal_diffusers(tree, models, cfg, normalize, size, layers):
    pil, picture = rgba_picture(*size, seed=layers)
    ours = run_decompose(models, picture, prompt="a ball on a table", true_cfg_scale=cfg, cfg_normalize=normalize,
                         layers=layers)
    theirs, _ = reference_layers(tree, pil, prompt="a ball on a table", negative_prompt=" ", true_cfg_scale=cfg,
                                 cfg_normalize=normalize, layers=layers)
    assert ours.layers.shape == theirs.shape == (layers, 4, *reversed(ours.size))
    assert ours.size == bucket_size(*size, SMALL)
    assert (ours.layers - theirs).abs().max() <= TOL


def test_no_cfg_equals_diffusers_without_negative_prompt(tree, models):
    pil, picture = rgba_picture(64, 64, seed=5, transparent=False)
    ours = run_decompose(models, picture, prompt="two cups", true_cfg_scale=1.0, layers=2)
    theirs, _ = reference_layers(tree, pil, prompt="two cups", true_cfg_scale=1.0, layers=2)
    assert (ours.layers - theirs).abs().max() <= TOL


def test_empty_prompt_captions_the_picture_as_diffusers(tree, models):
    pil, picture = rgba_picture(64, 48, seed=9)
    ours = run_decompose(models, picture, prompt="", layers=2, caption_language="en")
    theirs, their_caption = reference_layers(tree, pil, prompt="", negative_prompt=" ", use_en_prompt=True, layers=2,
                                             cfg_normalize=True)
    assert their_caption, "the reference wrote no caption: the test would compare nothing"
    assert ours.caption == their_caption
    assert (ours.layers - theirs).abs().max() <= TOL
    zh = run_decompose(models, picture, prompt="", layers=2, caption_language="zh")
    _, their_zh = reference_layers(tree, pil, prompt="", negative_prompt=" ", use_en_prompt=False, layers=2,
                                   cfg_normalize=True)
    assert zh.caption == their_zh


def test_caption_and_prompt_encodings_are_cached(models, monkeypatch):
    _, picture = rgba_picture(48, 48, seed=21)
    first = run_decompose(models, picture, prompt="", layers=1)
    encoder = models["text"].get()
    calls = []
    real = type(encoder.component.module).forward
    monkeypatch.setattr(type(encoder.component.module), "forward",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = run_decompose(models, picture, prompt="", layers=1, seed=12)
    assert calls == [] and again.caption == first.caption
    assert not torch.equal(again.layers, first.layers)  # another seed, same (cached) text


# --------------------------------------------------------------------------------------------------------------
# Loading: every file form gives the folder's model


def _forward(component, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = component.module.config
    with torch.inference_mode():
        return component.module(
            hidden_states=torch.randn(1, 48, config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 5, config.joint_attention_dim, generator=g),
            timestep=torch.tensor([0.4]), img_shapes=[[(1, 4, 4), (1, 4, 4), (1, 4, 4)]],
            additional_t_cond=torch.zeros(1, dtype=torch.long), return_dict=False,
        )[0]


@pytest.mark.parametrize("role", ["bf16", "fp8mixed"])
def test_transformer_files_load_the_folder_weights(tree, models, role):
    component = loading.transformer_source(None, tree["paths"][role], F32).get()
    assert loading.is_layered(component.module.config)
    assert torch.equal(_forward(component), _forward(models["transformer"]))


def test_gguf_transformer_stays_quantized_and_is_close(tree, models):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    gguf = loading.transformer_source(None, tree["paths"]["gguf"], F32).get()
    assert gguf.quantized and loading.is_layered(gguf.module.config)
    assert any(isinstance(p, GGUFParameter) for p in gguf.module.parameters())
    expected = _forward(models["transformer"])
    assert (_forward(gguf) - expected).abs().max() < 0.02 * expected.abs().max()  # Q8_0 rounding of the weights


def test_single_files_decompose_like_the_folder(tree, models):
    paths = tree["paths"]
    single = dict(transformer=loading.transformer_source(None, paths["bf16"], F32).get(),
                  vae=loading.vae_source(None, paths["vae"], F32).get(),
                  text=_text(paths["folder"], paths["te_head"]), schedule=FAMILY.scheduler_config(None))
    _, picture = rgba_picture(64, 48, seed=3)
    ours = run_decompose(single, picture, prompt="", layers=2)
    folder = run_decompose(models, picture, prompt="", layers=2)
    assert ours.caption == folder.caption
    assert (ours.layers - folder.layers).abs().max() <= TOL


def test_loader_node_outputs(tree, tmp_path):
    from editkit.nodes import comfy_bridge

    comfy_bridge.set_models_root(tree["paths"]["folder"].parents[1])
    try:
        node = qwen_layered_nodes.EditKitQwenImageLayeredLoader()
        spec = node.INPUT_TYPES()["required"]
        assert spec["diffusers_folder"][1]["default"] == "Qwen-Image-Layered"
        model, text, vae = node.load("Qwen-Image-Layered", FILES["fp8mixed"], "(from folder)", FILES["vae"])
    finally:
        comfy_bridge.set_models_root(None)
    assert model.transformer.get().name == FILES["fp8mixed"] and vae.get().name == FILES["vae"]
    assert text.caption_head().weight is not None


# --------------------------------------------------------------------------------------------------------------
# Bad input


def test_layers_below_one_is_refused(models):
    _, picture = rgba_picture(48, 48, seed=1)
    with pytest.raises(EditKitError, match="layers must be at least 1"):
        run_decompose(models, picture, prompt="x", layers=0)


def test_edit_transformer_is_refused(tmp_path_factory, models):
    edit_paths = QWEN.tree(tmp_path_factory.mktemp("qwen_edit_models"))["paths"]
    with pytest.raises(ModelFileError, match="not Qwen-Image-Layered"):
        loading.transformer_source(None, edit_paths["bf16"], F32).get()
    with pytest.raises(ModelFileError, match="not Qwen-Image-Layered"):
        loading.transformer_source(edit_paths["folder"], None, F32).get()
    with pytest.raises(ModelFileError, match="RGB VAE"):
        loading.vae_source(None, edit_paths["vae"], F32).get()
    # An Edit transformer or RGB VAE loaded elsewhere (EditKit · Qwen-Image Loader) is refused before sampling.
    _, picture = rgba_picture(48, 48, seed=2)
    wrong = dict(models, transformer=edit_transformer_source(edit_paths["folder"], None, F32).get())
    with pytest.raises(EditKitError, match="not Qwen-Image-Layered"):
        run_decompose(wrong, picture, prompt="x")
    wrong = dict(models, vae=edit_vae_source(edit_paths["folder"], None, F32).get())
    with pytest.raises(EditKitError, match="RGBA VAE"):
        run_decompose(wrong, picture, prompt="x")


def test_empty_prompt_without_head_is_refused(tree, models):
    paths = tree["paths"]
    text = _text(None, paths["te_no_head"])
    with pytest.raises(EditKitError, match="no language-model head"):
        text.caption_head()
    _, picture = rgba_picture(48, 48, seed=4)
    plain = text_encoder_source(paths["folder"], None, F32)  # the Qwen-Image Loader's handle: no head
    with pytest.raises(EditKitError, match="prompt is empty"):
        decompose(models["transformer"], plain, models["vae"], picture, TorchRuntime("cpu"),
                  scheduler_config=models["schedule"], prompt=" ", resolution=SMALL, steps=2)
    result = decompose(models["transformer"], plain, models["vae"], picture, TorchRuntime("cpu"),
                       scheduler_config=models["schedule"], prompt="a cat", resolution=SMALL, steps=2, layers=1)
    assert result.layers.shape[0] == 1


# --------------------------------------------------------------------------------------------------------------
# The node: RGBA IMAGE batch + alpha MASK batch


def test_node_outputs_rgba_layers_and_alpha_masks(models, torch_runtime):
    node = qwen_layered_nodes.EditKitQwenImageLayered()
    model = loading.LayeredModel(_Loaded(models["transformer"]), models["schedule"])
    vae = _Loaded(models["vae"])
    _, first = rgba_picture(80, 48, seed=30, transparent=False)
    _, second = rgba_picture(80, 48, seed=31, transparent=False)
    images = torch.cat([first, second])[:, :3].permute(0, 2, 3, 1)  # IMAGE [2,H,W,3]
    layers, alpha = node.run(model, models["text"], vae, images, layers=3, prompt="a vase", steps=2,
                             true_cfg_scale=4.0, resolution=SMALL, seed=5)
    width, height = bucket_size(80, 48, SMALL)
    assert layers.shape == (6, height, width, 4) and alpha.shape == (6, height, width)
    assert torch.equal(alpha, layers[..., 3])
    single = run_decompose(models, first, prompt="a vase", layers=3, seed=5, steps=2)  # picture 1 of the batch: the seed
    assert (layers[:3] - single.layers.permute(0, 2, 3, 1)).abs().max() <= TOL
    second_run = run_decompose(models, second, prompt="a vase", layers=3, seed=6, steps=2)  # picture 2: seed + 1
    assert (layers[3:] - second_run.layers.permute(0, 2, 3, 1)).abs().max() <= TOL


def test_node_reads_transparency_from_load_image_mask(models, torch_runtime):
    node = qwen_layered_nodes.EditKitQwenImageLayered()
    model = loading.LayeredModel(_Loaded(models["transformer"]), models["schedule"])
    _, picture = rgba_picture(48, 48, seed=40)
    image = picture[:, :3].permute(0, 2, 3, 1)
    mask = 1.0 - picture[:, 3]  # Load Image's MASK: 1 where transparent
    with_mask, _ = node.run(model, models["text"], _Loaded(models["vae"]), image, layers=1, prompt="a", steps=2,
                               resolution=SMALL, seed=1, mask=mask)
    direct = run_decompose(models, picture, prompt="a", layers=1, seed=1, steps=2)
    assert (with_mask - direct.layers.permute(0, 2, 3, 1)).abs().max() <= TOL
    rgba_image, _ = node.run(model, models["text"], _Loaded(models["vae"]), picture.permute(0, 2, 3, 1), layers=1,
                             prompt="a", steps=2, resolution=SMALL, seed=1)  # an IMAGE with its own alpha channel
    assert torch.equal(rgba_image, with_mask)
    placeholder = torch.zeros(1, 64, 64)  # Load Image's mask of a picture without alpha: means opaque
    opaque, _ = node.run(model, models["text"], _Loaded(models["vae"]), image, layers=1, prompt="a", steps=2,
                            resolution=SMALL, seed=1, mask=placeholder)
    opaque_direct = run_decompose(models, torch.cat([picture[:, :3], torch.ones_like(picture[:, :1])], 1),
                                  prompt="a", layers=1, seed=1, steps=2)
    assert (opaque - opaque_direct.layers.permute(0, 2, 3, 1)).abs().max() <= TOL


def test_node_refuses_bad_batches(models, torch_runtime):
    node = qwen_layered_nodes.EditKitQwenImageLayered()
    model = loading.LayeredModel(_Loaded(models["transformer"]), models["schedule"])
    with pytest.raises(EditKitError, match="no picture"):
        node.run(model, models["text"], _Loaded(models["vae"]), torch.zeros(0, 48, 48, 3), prompt="a")
    with pytest.raises(EditKitError, match="layers must be at least 1"):
        node.run(model, models["text"], _Loaded(models["vae"]), torch.zeros(1, 48, 48, 3), prompt="a", layers=0)
    with pytest.raises(EditKitError, match="mask is 32x32"):
        node.run(model, models["text"], _Loaded(models["vae"]), torch.zeros(1, 48, 48, 3), prompt="a",
                 mask=torch.ones(1, 32, 32))


class _Loaded:
    """A loader handle around an already loaded component (what LazyModel.get returns)."""

    def __init__(self, component):
        self.component = component

    def get(self):
        return self.component
