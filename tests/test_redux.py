"""FLUX.1 Redux prior: equal to diffusers' FluxPriorReduxPipeline, and the controls EditKit adds.

The reference is diffusers' own pipeline on the same SigLIP, embedder and image processor. Its
text-encoder-free prompt is hard-coded at FLUX.1's real widths (512 x 4096 zero T5 tokens, 768
zero pooled), so the parity tests use an embedder at the real output width 4096 (its input width
is the tiny SigLIP's) and a tiny transformer whose config says 4096/768; the tiny models tree
(32/64) checks that the widths come from the config.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from editkit.nodes.redux_nodes import EditKitReduxEncode
from editkit.pipelines.core.errors import EditKitError
from editkit.pipelines.core.loading import LazyModel
from editkit.pipelines.core.runtime import Component, TorchRuntime
from editkit.pipelines.flux.family import FAMILY
from editkit.pipelines.flux.loading import FluxModel
from editkit.pipelines.flux.redux import preprocess
from editkit.pipelines.flux.redux import prior as redux_prior
from editkit.pipelines.flux.redux.loading import ReduxPrior, load_prior
from node_calls import call_node
from tiny.flux1 import FAMILY as FLUX1
from tiny.redux import FAMILY as REDUX
from tiny.redux import tiny_processor

F32 = torch.float32
SMALL_GRID = dict(image_size=24, patch_size=4)  # 6x6 tokens: keeps the 4096-wide embedder fast


def _handle(value, tag):
    return LazyModel(("test", tag, id(value)), lambda: value, tag)


@pytest.fixture(scope="module")
def real_width():
    """Tiny SigLIP + a Redux embedder at FLUX.1's real T5 width, and diffusers' pipeline over them."""
    from diffusers import FluxPriorReduxPipeline

    encoder, processor = REDUX.build("image_encoder", **SMALL_GRID), tiny_processor(SMALL_GRID["image_size"])
    embedder = REDUX.build("image_embedder", txt_in_features=4096)
    pipe = FluxPriorReduxPipeline(image_encoder=encoder, feature_extractor=processor, image_embedder=embedder)
    pipe.set_progress_bar_config(disable=True)
    prior = ReduxPrior(Component(encoder, "text_encoder", "siglip", F32), Component(embedder, "text_encoder", "redux",
                                                                                      F32), processor)
    transformer = FLUX1.build("dev", joint_attention_dim=4096, pooled_projection_dim=768)
    model = FluxModel(_handle(Component(transformer, "diffusion", "dev-4096", F32), "dev"), FAMILY.scheduler_config(None))
    return types.SimpleNamespace(pipe=pipe, redux=types.SimpleNamespace(prior=_handle(prior, "prior")), model=model,
                                 transformer=transformer)


def _pictures(count=2, width=70, height=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, height, width, 3, generator=g) * 255).round() / 255


def _pil(image):
    return [preprocess.to_pil(p) for p in image.movedim(-1, 1)]


def _encode(handles, image, **kw):
    kw.setdefault("crop", "none")  # diffusers squashes to a square
    return call_node(EditKitReduxEncode, redux=handles.redux, image=image, model=handles.model, **kw)


@pytest.mark.parametrize("count, weights, strength", [(1, "", 1.0), (1, "", 0.6), (2, "", 1.0), (2, "0.7, 0.3", 0.8)])
def test_conditioning_equals_diffusers_prior(real_width, count, weights, strength, torch_runtime):
    image = _pictures(count)
    (conditioning, _seen) = _encode(real_width, image, weights=weights, strength=strength)
    w = [float(x) for x in weights.split(",")] if weights else [1.0] * count
    scales = [strength * x for x in w]
    with torch.inference_mode():
        ref = real_width.pipe(image=_pil(image), prompt_embeds_scale=scales,
                              pooled_prompt_embeds_scale=[strength] * count)
    states, extra = conditioning[0]
    assert len(conditioning) == 1 and "guidance" not in extra
    assert states.shape == ref.prompt_embeds.shape == (1, 512 + 36, 4096)
    torch.testing.assert_close(states, ref.prompt_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(extra["pooled_output"], ref.pooled_prompt_embeds, atol=1e-5, rtol=0)


def test_concat_equals_chained_style_model_apply(real_width, torch_runtime):
    """concat = ComfyUI's StyleModelApply applied once per picture: prompt, then each picture's scaled tokens."""
    image = _pictures(2)
    (conditioning, _) = _encode(real_width, image, weights="0.5, 2", strength=0.9, combine="concat")
    with torch.inference_mode():
        tokens = [real_width.pipe(image=_pil(image[i:i + 1])).prompt_embeds[:, 512:] for i in range(2)]
    expected = torch.cat([torch.zeros(1, 512, 4096), tokens[0] * 0.45, tokens[1] * 1.8], dim=1)
    torch.testing.assert_close(conditioning[0][0], expected, atol=1e-5, rtol=0)


def test_appends_to_a_prompt_and_keeps_it(real_width, torch_runtime):
    g = torch.Generator().manual_seed(4)
    prompt = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                       "guidance": 4.0}]]
    image = _pictures(1)
    (conditioning, _) = _encode(real_width, image, conditioning=prompt, strength=0.5)
    with torch.inference_mode():
        tokens = real_width.pipe(image=_pil(image)).prompt_embeds[:, 512:]
    states, extra = conditioning[0]
    assert torch.equal(states[:, :7], prompt[0][0]) and torch.equal(extra["pooled_output"], prompt[0][1]["pooled_output"])
    assert extra["guidance"] == 4.0
    torch.testing.assert_close(states[:, 7:], tokens * 0.5, atol=1e-5, rtol=0)


def test_variation_equals_flux_pipeline_fed_the_prior(real_width, tiny_models, torch_runtime):
    """The whole Redux variation, node to node: EditKit · Flux Sampler on EditKit · Redux Encode's output
    equals FluxPipeline (no text encoders) given FluxPriorReduxPipeline's embeddings, same seed noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from editkit.nodes.flux_generate_nodes import EditKitFluxSampler
    from editkit.pipelines.flux import flow
    from editkit.pipelines.flux import vae as vae_ops
    from editkit.pipelines.flux.loading import vae_source

    vae = vae_source(None, tiny_models / "vae" / "ae.safetensors", F32)
    image = _pictures(1)
    (conditioning, _) = _encode(real_width, image)
    _images, latent = call_node(EditKitFluxSampler, model=real_width.model, vae=vae, conditioning=conditioning,
                                width=32, height=48, seed=42, steps=3, guidance=2.5, batch_size=2)
    with torch.inference_mode():
        prior = real_width.pipe(image=_pil(image))
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FAMILY.scheduler_config(None)),
                            vae=vae.get().module, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=real_width.transformer)
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(prompt_embeds=prior.prompt_embeds, pooled_prompt_embeds=prior.pooled_prompt_embeds,
                      height=48, width=32, num_inference_steps=3, guidance_scale=2.5, num_images_per_prompt=2,
                      generator=torch.Generator().manual_seed(42), output_type="latent").images
    ours = flow.pack(vae_ops.raw_to_model(vae.get(), latent["samples"]))
    assert ours.shape == theirs.shape == (2, 6, 64)  # 48x32 pixels: 3x2 tokens
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# Tiny models tree: widths from the config, token downsampling, loading


@pytest.fixture(scope="module")
def tree(tiny_models):
    from editkit.nodes import comfy_bridge
    from editkit.nodes.flux_nodes import EditKitFluxLoader
    from editkit.nodes.redux_nodes import EditKitReduxLoader

    comfy_bridge.set_models_root(tiny_models)
    try:
        (redux,) = call_node(EditKitReduxLoader, diffusers_folder="FLUX.1-Redux-dev", weight_dtype="fp32")
        model, text_encoders, _vae = call_node(EditKitFluxLoader, diffusers_folder="(none)",
                                               transformer_file="flux1-dev.safetensors", vae_file="ae.safetensors",
                                               weight_dtype="fp32")
    finally:
        comfy_bridge.set_models_root(None)
    return types.SimpleNamespace(redux=redux, model=model, text_encoders=text_encoders, root=tiny_models)


def test_zero_prompt_widths_come_from_the_transformer_config(tree, torch_runtime):
    from diffusers import FluxPriorReduxPipeline

    image = _pictures(1, 50, 50)
    (conditioning, seen) = _encode(tree, image)
    config = tree.model.transformer.get().module.config
    states, extra = conditioning[0]
    assert (config.joint_attention_dim, config.pooled_projection_dim) == (32, 64)  # tiny, not 4096/768
    assert states.shape == (1, 512 + 27 * 27, 32) and extra["pooled_output"].shape == (1, 64)
    assert not states[:, :512].any() and not extra["pooled_output"].any()
    pipe = FluxPriorReduxPipeline.from_pretrained(str(tree.root / "diffusers" / "FLUX.1-Redux-dev"),
                                                  local_files_only=True)
    with torch.inference_mode():
        expected = pipe.image_embedder(pipe.encode_image(_pil(image), "cpu", 1)).image_embeds
    torch.testing.assert_close(states[:, 512:], expected, atol=1e-5, rtol=0)
    assert seen.shape == (1, 54, 54, 3)
    assert tree.text_encoders._value is None  # the Flux loader's text encoders were never loaded


def test_single_files_equal_the_diffusers_folder(tree, torch_runtime):
    root = tree.root
    from_files = load_prior(None, root / "clip_vision" / "sigclip_vision_patch14_384.safetensors",
                            root / "style_models" / "flux1-redux-dev.safetensors", F32)
    assert not from_files.encoder.module.config.vision_use_head  # ComfyUI's file has no pooling head
    assert (from_files.grid, from_files.token_width, from_files.encoder.module.config.num_attention_heads) == (27, 32, 2)
    image = _pictures(2, 61, 37)
    settings = redux_prior.ReduxSettings(crop="pad")
    a = redux_prior.encode(tree.redux.prior.get(), image.movedim(-1, 1), settings, TorchRuntime("cpu"))
    b = redux_prior.encode(from_files, image.movedim(-1, 1), settings, TorchRuntime("cpu"))
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-6, rtol=0)


def test_downsampling_factor_one_is_the_identity_and_three_keeps_81_tokens(tree, torch_runtime):
    prior = tree.redux.prior.get()
    values = preprocess.pixel_values(_pil(_pictures(2, 54, 54)), prior.processor)
    tokens = redux_prior.image_tokens(prior, values, TorchRuntime("cpu"))
    assert tokens.shape == (2, 729, 32)
    for mode in redux_prior.DOWNSAMPLING_MODES:
        assert torch.equal(redux_prior.downsample(tokens, 1.0, mode), tokens)
        assert redux_prior.downsample(tokens, 3.0, mode).shape == (2, math.ceil(27 / 3) ** 2, 32)
    assert redux_prior.downsample(tokens, 2.0, "area").shape == (2, 14 * 14, 32)  # ceil(27/2) = 14
    # area with factor 3 on a 27 grid is the mean of each 3x3 block of tokens, row-major
    grid = tokens.reshape(2, 27, 27, 32)
    blocks = grid.reshape(2, 9, 3, 9, 3, 32).mean(dim=(2, 4)).reshape(2, 81, 32)
    torch.testing.assert_close(redux_prior.downsample(tokens, 3.0, "area"), blocks, atol=1e-6, rtol=0)
    nearest = redux_prior.downsample(tokens, 3.0, "nearest")
    assert torch.equal(nearest, grid[:, ::3, ::3].reshape(2, 81, 32))


def test_encode_node_downsamples_and_sums(tree, torch_runtime):
    image = _pictures(2, 54, 54)
    (full, _) = _encode(tree, image, weights="1, 0")
    (down, _) = _encode(tree, image, weights="1, 0", downsampling_factor=3.0, downsampling_mode="bicubic")
    assert down[0][0].shape == (1, 512 + 81, 32)
    expected = F.interpolate(full[0][0][:, 512:].transpose(1, 2).reshape(1, 32, 27, 27), size=(9, 9),
                             mode="bicubic", align_corners=False).reshape(1, 32, 81).transpose(1, 2)
    torch.testing.assert_close(down[0][0][:, 512:], expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# Crop modes


def _stripes(width=70, height=40):
    """Left third red, middle green, right third blue, with a white top row to see vertical placement."""
    image = torch.zeros(1, height, width, 3)
    thirds = [0, width // 3, 2 * width // 3, width]
    for c in range(3):
        image[0, :, thirds[c]:thirds[c + 1], c] = 1.0
    image[0, 0] = 1.0
    return image


def _seen(tree, image, **kw):
    return _encode(tree, image, **kw)[1]


def _processed(tree, picture: Image.Image):
    prior = tree.redux.prior.get()
    return preprocess.seen_pictures(preprocess.pixel_values([picture], prior.processor), prior.processor)


@pytest.mark.parametrize("width, height", [(70, 40), (37, 81)])
def test_crop_center_takes_the_middle_square(tree, width, height, torch_runtime):
    image = _stripes(width, height)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    crop = _pil(image[:, top:top + side, left:left + side])[0]
    assert torch.equal(_seen(tree, image, crop="center"), _processed(tree, crop))


def _on_grey_square(image, left, top, side):
    """The ``side``-square at (left, top) of a picture, grey where it leaves the picture (built with numpy)."""
    array = np.full((side, side, 3), 128, dtype=np.uint8)
    picture = (image[0].numpy() * 255).round().astype(np.uint8)
    height, width = picture.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, height), min(left + side, width)
    array[y0 - top:y1 - top, x0 - left:x1 - left] = picture[y0:y1, x0:x1]
    return Image.fromarray(array, "RGB")


@pytest.mark.parametrize("width, height", [(70, 40), (37, 81)])
def test_crop_none_squashes_and_pad_keeps_the_aspect(tree, width, height, torch_runtime):
    image = _stripes(width, height)
    assert torch.equal(_seen(tree, image, crop="none"), _processed(tree, _pil(image)[0]))
    side = max(width, height)
    expected = _on_grey_square(image, -((side - width) // 2), -((side - height) // 2), side)
    assert torch.equal(_seen(tree, image, crop="pad"), _processed(tree, expected))


def test_autocrop_frames_the_mask_with_its_margin(tree, torch_runtime):
    image = _stripes(70, 40)
    mask = torch.zeros(1, 40, 70)
    mask[0, 5:15, 50:60] = 1.0
    seen = _seen(tree, image, crop="autocrop", mask=mask, autocrop_margin=0.0)
    assert torch.equal(seen, _processed(tree, _pil(image[:, 5:15, 50:60])[0]))
    # margin 0.5 → a 20-pixel square centred on the box, moved down to stay inside the picture
    seen = _seen(tree, image, crop="autocrop", mask=mask, autocrop_margin=0.5)
    assert torch.equal(seen, _processed(tree, _pil(image[:, 0:20, 45:65])[0]))
    # margin 2 → a 50-pixel square: taller than the picture (grey above and below), inside it sideways
    seen = _seen(tree, image, crop="autocrop", mask=mask, autocrop_margin=2.0)
    assert torch.equal(seen, _processed(tree, _on_grey_square(image, 20, -5, 50)))
    # one mask per picture: each picture framed by its own mask
    second = torch.zeros(1, 40, 70)
    second[0, 20:30, 0:10] = 1.0
    seen = _seen(tree, image.expand(2, -1, -1, -1), crop="autocrop", mask=torch.cat([mask, second]),
                 autocrop_margin=0.0)
    assert torch.equal(seen[1:], _processed(tree, _pil(image[:, 20:30, 0:10])[0]))


def test_autocrop_needs_a_mask_that_is_not_empty(tree, torch_runtime):
    image = _stripes()
    with pytest.raises(EditKitError, match="mask is empty"):
        _encode(tree, image, crop="autocrop", mask=torch.zeros(1, 40, 70))
    with pytest.raises(EditKitError, match="needs a mask"):
        _encode(tree, image, crop="autocrop")
    with pytest.raises(EditKitError, match="is 20x20 but the pictures are 70x40"):
        _encode(tree, image, crop="autocrop", mask=torch.ones(1, 20, 20))


# --------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("weights, message", [
    ("1, 2, 3", "lists 3 value\\(s\\) but the image batch holds 2"),
    ("0.5, -1", "weights must be 0 or more"),
    ("half, half", "not a comma-separated list"),
])
def test_bad_weights(tree, weights, message, torch_runtime):
    with pytest.raises(EditKitError, match=message):
        _encode(tree, _pictures(2), weights=weights)


def test_conditioning_of_another_family_is_refused(tree, torch_runtime):
    qwen = [[torch.zeros(1, 12, 3584), {}]]
    with pytest.raises(EditKitError, match="not a FLUX.1 prompt: token width 3584 \\(3584 is the width of Qwen"):
        _encode(tree, _pictures(1), conditioning=qwen)
    wrong_pooled = [[torch.zeros(1, 5, 32), {"pooled_output": torch.zeros(1, 768)}]]
    with pytest.raises(EditKitError, match="pooled vector is 768 wide, but this FLUX.1 transformer expects 64"):
        _encode(tree, _pictures(1), conditioning=wrong_pooled)


def test_without_model_or_conditioning_the_widths_are_unknown(tree, torch_runtime):
    with pytest.raises(EditKitError, match="needs either a conditioning to append to, or the FLUX.1 model"):
        call_node(EditKitReduxEncode, redux=tree.redux, image=_pictures(1))
    prompt = [[torch.ones(1, 3, 32), {"pooled_output": torch.ones(1, 64)}]]
    (conditioning, _) = call_node(EditKitReduxEncode, redux=tree.redux, image=_pictures(1), conditioning=prompt)
    assert conditioning[0][0].shape == (1, 3 + 729, 32)


def _write(path, tensors):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_foreign_model_files_are_named(tree, tmp_path):
    root = tree.root
    siglip = root / "clip_vision" / "sigclip_vision_patch14_384.safetensors"
    style = root / "style_models" / "flux1-redux-dev.safetensors"
    t2i = _write(tmp_path / "t2iadapter_style.safetensors", {"style_embedding": torch.zeros(1, 8, 1024)})
    with pytest.raises(EditKitError, match="T2I-Adapter style model"):
        load_prior(None, siglip, t2i, F32)
    with pytest.raises(EditKitError, match="Not a FLUX.1 Redux style model"):
        load_prior(None, siglip, _write(tmp_path / "other.safetensors", {"w": torch.zeros(2)}), F32)
    clip_h = _write(tmp_path / "clip_vision_h.safetensors", {
        "vision_model.embeddings.class_embedding": torch.zeros(16),
        "vision_model.pre_layrnorm.weight": torch.zeros(16)})
    with pytest.raises(EditKitError, match="This is a CLIP vision encoder"):
        load_prior(None, clip_h, style, F32)
    siglip_512 = _write(tmp_path / "siglip_512.safetensors", {
        "vision_model.embeddings.patch_embedding.weight": torch.zeros(1152, 3, 16, 16),
        "vision_model.embeddings.position_embedding.weight": torch.zeros(1024, 1152),
        "vision_model.post_layernorm.weight": torch.zeros(1152),
        "vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4304, 1152)})
    with pytest.raises(EditKitError, match="so400m-patch16-512 .*trained on so400m-patch14-384"):
        load_prior(None, siglip_512, style, F32)
    wide = _write(tmp_path / "redux_wide.safetensors", dict(REDUX.build("image_embedder", redux_dim=72).state_dict()))
    with pytest.raises(EditKitError, match="outputs 144-wide tokens but the Redux embedder reads 72"):
        load_prior(None, siglip, wide, F32)
    with pytest.raises(EditKitError, match="holds FluxFillPipeline, not the Redux prior"):
        load_prior(root / "diffusers" / "FLUX.1-Fill-dev", None, None, F32)


def test_transformer_of_another_width_is_refused(tree, real_width, torch_runtime):
    with pytest.raises(EditKitError, match="makes 32-wide tokens but this FLUX.1 transformer reads 4096"):
        call_node(EditKitReduxEncode, redux=tree.redux, image=_pictures(1), model=real_width.model)


def test_loader_needs_a_folder_or_both_files(tree):
    from editkit.nodes import comfy_bridge
    from editkit.nodes.redux_nodes import EditKitReduxLoader

    comfy_bridge.set_models_root(tree.root)
    try:
        with pytest.raises(EditKitError, match="needs the FLUX.1-Redux-dev diffusers folder, or both single files"):
            call_node(EditKitReduxLoader, diffusers_folder="(none)",
                      style_model_file="flux1-redux-dev.safetensors")
        (redux,) = call_node(EditKitReduxLoader, diffusers_folder="(none)",
                             style_model_file="flux1-redux-dev.safetensors",
                             clip_vision_file="sigclip_vision_patch14_384.safetensors")
    finally:
        comfy_bridge.set_models_root(None)
    assert redux.prior._value is None  # nothing read until a node encodes


def test_pictures_keep_their_8bit_values():
    image = _pictures(1, 9, 5)
    array = np.asarray(preprocess.to_pil(image[0].movedim(-1, 0)), dtype=np.float32) / 255
    assert np.array_equal(array, image[0].numpy())
