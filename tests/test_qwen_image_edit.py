"""Qwen-Image-Edit-2509 and -2511 edits equal diffusers' reference pipeline, and keep EditKit's promises.

Parity runs diffusers' ``QwenImageEditPlusPipeline`` (and ``QwenImageEditPipeline`` for the original
Edit) on the same tiny weights, with the module constants for the vision-language and VAE copy
sizes patched down for speed; EditKit runs its "Qwen reference pipeline" preset with the same
sizes. The noise is the CPU ``torch.randn`` of the unpacked latent shape from the seed in both.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.pipelines.core.errors import EditKitError
from editkit.pipelines.core.runtime import Component, TorchRuntime
from editkit.pipelines.qwen_image import sizes
from editkit.pipelines.qwen_image.edit import edit
from editkit.pipelines.qwen_image.family import FAMILY
from editkit.pipelines.qwen_image.loading import (
    EDIT,
    EDIT_2509,
    EDIT_2511,
    transformer_source,
    vae_source,
)
from editkit.pipelines.qwen_image.text import text_encoder_source
from tiny.qwen_image import FAMILY as QWEN
from tiny.qwen_image import reference_pipeline, transformer_2511

F32 = torch.float32
VL_AREA = 56 * 56  # patched CONDITION_IMAGE_SIZE
VAE_AREA = 64 * 64  # patched VAE_IMAGE_SIZE
REFERENCE = sizes.ReferenceSizes(sizes.REFERENCE, VL_AREA, VAE_AREA)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return QWEN.tree(tmp_path_factory.mktemp("qwen_models"))


@pytest.fixture(scope="module")
def models(tree):
    folder = tree["paths"]["folder"]
    return dict(
        transformer=transformer_source(folder, None, F32).get(),
        vae=vae_source(folder, None, F32).get(),
        text=text_encoder_source(folder, None, F32).get(),
        schedule=FAMILY.scheduler_config(folder),
    )


def picture(width: int, height: int, seed: int) -> tuple[Image.Image, torch.Tensor]:
    """A random 8-bit picture as PIL (for diffusers) and as a ``[1,3,H,W]`` 0..1 tensor (for EditKit)."""
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pil = Image.fromarray(array)
    return pil, torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def run_edit(models, pictures, prompt="make the jacket red", **kwargs):
    kwargs.setdefault("steps", 2)
    kwargs.setdefault("seed", 7)
    return edit(models["transformer"], models["text"], models["vae"], pictures, prompt, TorchRuntime("cpu"),
                scheduler_config=models["schedule"], **kwargs)


def reference_edit(pipe, pils, prompt, *, negative, cfg, steps, seed, width, height):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    with mock.patch.object(plus, "CONDITION_IMAGE_SIZE", VL_AREA), mock.patch.object(plus, "VAE_IMAGE_SIZE", VAE_AREA):
        out = pipe(image=pils, prompt=prompt, negative_prompt=negative, true_cfg_scale=cfg, height=height, width=width,
                   num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images


SIZES = [(80, 48), (48, 64), (64, 64)]  # image 1 is 5:3, the references other shapes


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_edit_equals_diffusers_edit_plus(count, cfg, tree, models):
    pils, tensors = zip(*(picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:count])))
    prompt, negative = "change the blue tracksuit to red", "blurry, low quality"
    ours = run_edit(models, list(tensors), prompt, negative_prompt=negative, true_cfg_scale=cfg,
                    output=sizes.OutputSize(), references=REFERENCE)
    width, height = ours.size
    assert (width, height) == (80, 48)  # "match image 1": already a multiple of 16 and under the cap
    expected = reference_edit(reference_pipeline(tree["components"]), list(pils), prompt,
                              negative=negative if cfg > 1 else None, cfg=cfg, steps=2, seed=7, width=width,
                              height=height)
    assert ours.images.shape == expected.shape == (1, 3, 48, 80)
    assert (ours.images - expected).abs().max() < 1e-5
    assert expected.std() > 0.05  # a real picture, not a constant


@pytest.fixture(scope="module")
def models_2511(tree, models):
    """The 2509 models with the transformer from ComfyUI's 2511 file (the same weights, marked 2511)."""
    transformer = transformer_source(None, tree["paths"]["bf16_2511"], F32).get()
    assert transformer.module.config.zero_cond_t
    return {**models, "transformer": transformer}


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_2511_edit_equals_diffusers_edit_plus_with_zero_cond_t(count, cfg, tree, models, models_2511):
    pils, tensors = zip(*(picture(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:count])))
    prompt, negative = "change the blue tracksuit to red", "blurry, low quality"
    common = dict(negative_prompt=negative, true_cfg_scale=cfg, output=sizes.OutputSize(), references=REFERENCE)
    ours = run_edit(models_2511, list(tensors), prompt, variant=EDIT_2511, **common)
    pipe = reference_pipeline({**tree["components"], "transformer": transformer_2511(tree["components"])})
    expected = reference_edit(pipe, list(pils), prompt, negative=negative if cfg > 1 else None, cfg=cfg, steps=2,
                              seed=7, width=80, height=48)
    assert ours.images.shape == expected.shape == (1, 3, 48, 80)
    assert (ours.images - expected).abs().max() < 1e-5
    as_2509 = run_edit(models, list(tensors), prompt, variant=EDIT_2509, **common)  # 2511's weights without the switch
    assert (as_2509.images - expected).abs().max() > 20 * 1e-5  # well outside the parity tolerance
    assert (as_2509.latents - ours.latents).abs().max() > 1e-3


def test_2511_batched_true_cfg_equals_unbatched(models_2511):
    """Both CFG branches in one call: zero_cond_t's timestep-0 rows follow the doubled batch."""
    tensors = [picture(64, 48, seed=5)[1], picture(48, 48, seed=6)[1]]
    common = dict(negative_prompt="blurry, oversaturated, extra fingers", true_cfg_scale=5.0, steps=3, batch_size=2,
                  variant=EDIT_2511)
    batched = run_edit(models_2511, tensors, cfg_batched=True, **common)
    unbatched = run_edit(models_2511, tensors, cfg_batched=False, **common)
    assert (batched.latents - unbatched.latents).abs().max() < 1e-5


def test_2509_file_gives_todays_edit_bit_for_bit(tree, models):
    """The 2509 transformer file loads without zero_cond_t: the edit equals the one the untouched in-memory model
    (never passed through the loader) gives, bit for bit."""
    loaded = transformer_source(None, tree["paths"]["bf16"], F32).get()
    assert loaded.module.config.zero_cond_t is False
    untouched = Component(tree["components"]["transformer"], "diffusion", "in-memory 2509", F32)
    tensors = [picture(80, 48, seed=0)[1], picture(48, 64, seed=1)[1]]
    for cfg in (1.0, 4.0):
        got = run_edit({**models, "transformer": loaded}, tensors, true_cfg_scale=cfg, references=REFERENCE)
        want = run_edit({**models, "transformer": untouched}, tensors, true_cfg_scale=cfg, references=REFERENCE)
        assert torch.equal(got.images, want.images) and torch.equal(got.latents, want.latents)


def test_original_edit_variant_equals_diffusers_edit_pipeline(tree, models):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as plain

    pil, tensor = picture(64, 48, seed=3)
    ours = run_edit(models, [tensor], "remove the glasses", negative_prompt=" ", true_cfg_scale=3.0,
                    output=sizes.OutputSize(), references=REFERENCE, variant=EDIT)
    original = plain.calculate_dimensions
    with mock.patch.object(plain, "calculate_dimensions", lambda area, ratio: original(VAE_AREA, ratio)):
        expected = reference_pipeline(tree["components"], "edit")(
            image=pil, prompt="remove the glasses", negative_prompt=" ", true_cfg_scale=3.0, height=48, width=64,
            num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert (ours.images - expected).abs().max() < 1e-5
    with pytest.raises(EditKitError, match="original Qwen-Image-Edit takes exactly one picture"):
        run_edit(models, [tensor, tensor], variant=EDIT)


def test_batched_true_cfg_with_different_prompt_lengths_equals_unbatched(models):
    _, tensor = picture(64, 48, seed=5)
    short, long = " ", "blurry, oversaturated, extra fingers, watermark, text artifacts, jpeg noise"
    pictures = [sizes.vl_copy(tensor, *sizes.calculate_dimensions(sizes.VL_AREA, 64 / 48))]
    runtime = TorchRuntime("cpu")
    assert models["text"].encode(short, pictures, "Qwen-Image-Edit-2509", runtime).shape[1] != \
        models["text"].encode(long, pictures, "Qwen-Image-Edit-2509", runtime).shape[1]
    for negative in (short, long):  # the negative shorter, then longer than the prompt
        common = dict(negative_prompt=negative, true_cfg_scale=5.0, steps=3, batch_size=2)
        batched = run_edit(models, [tensor], cfg_batched=True, **common)
        unbatched = run_edit(models, [tensor], cfg_batched=False, **common)
        assert (batched.latents - unbatched.latents).abs().max() < 1e-5
        assert (batched.images - unbatched.images).abs().max() < 1e-5


class _Calls:
    """Records what the transformer and the text encoder were called with."""

    def __init__(self, models):
        self.shapes, self.encodes = [], 0
        self._hooks = [
            models["transformer"].module.register_forward_pre_hook(self._transformer, with_kwargs=True),
            models["text"].component.module.register_forward_pre_hook(self._text, with_kwargs=True),
        ]

    def _transformer(self, module, args, kwargs):
        self.shapes.append(kwargs["img_shapes"][0])

    def _text(self, module, args, kwargs):
        self.encodes += 1

    def close(self):
        for hook in self._hooks:
            hook.remove()


@pytest.mark.parametrize("count", [5, 7])
def test_five_and_seven_pictures(count, models):
    tensors = [picture(48 + 16 * (i % 3), 48, seed=10 + i)[1] for i in range(count)]
    calls = _Calls(models)
    try:
        result = run_edit(models, tensors, "combine them", true_cfg_scale=1.0, references=REFERENCE)
    finally:
        calls.close()
    assert result.images.shape == (1, 3, 48, 48)
    assert len(result.reference_sizes) == count
    assert all(len(shapes) == 1 + count for shapes in calls.shapes)  # output + every picture reaches the model


def test_match_image_1_sizes_for_odd_aspect_ratios():
    one_mp = sizes.OutputSize(sizes.MATCH_IMAGE_1, max_megapixels=1.0)
    assert one_mp.resolve(1000, 333) == (1008, 336)  # nearest multiples of 16, under the cap
    assert one_mp.resolve(33, 1000) == (32, 1008)
    assert one_mp.resolve(4000, 3000) == (1168, 880)  # scaled to <= 1 MP, then rounded down
    assert one_mp.resolve(5000, 400) == (3616, 288)  # 25:2 keeps its shape within one multiple
    for w, h in [(1000, 333), (33, 1000), (4000, 3000), (5000, 400), (1920, 1080)]:
        out_w, out_h = one_mp.resolve(w, h)
        assert out_w % 16 == 0 and out_h % 16 == 0 and out_w * out_h <= 2**20
    assert sizes.OutputSize(sizes.MATCH_IMAGE_1, max_megapixels=4.0).resolve(1920, 1080) == (1920, 1088)
    with pytest.raises(EditKitError, match="more than max_megapixels"):
        sizes.OutputSize(sizes.EXPLICIT, 2048, 2048, 1.0).resolve(64, 64)
    with pytest.raises(EditKitError, match="multiples of 16"):
        sizes.OutputSize(sizes.EXPLICIT, 1000, 512, 1.0).resolve(64, 64)


def test_reference_sizes_follow_diffusers_and_no_shift_puts_image_1_at_the_output_size():
    plan = sizes.ReferenceSizes(sizes.REFERENCE).plan([(1000, 333), (512, 512)], (1008, 336))
    assert plan == [((672, 224), (1760, 576)), ((384, 384), (1024, 1024))]  # 665.4x221.6 / 1774.5x590.9 to 32s
    plan = sizes.ReferenceSizes(sizes.NO_SHIFT).plan([(1000, 333), (512, 512)], (1008, 336))
    assert plan == [((672, 224), (1008, 336)), ((384, 384), (1024, 1024))]


def test_no_shift_with_a_mask_keeps_every_pixel_outside_exactly(models):
    _, tensor = picture(70, 37, seed=21)  # odd size: the model works at 64x32, the result comes back at 70x37
    mask = torch.zeros(1, 1, 37, 70)
    mask[..., 8:30, 10:50] = 1.0
    mask[..., 8:30, 50:60] = 0.4  # a soft edge
    result = run_edit(models, [tensor], mask=mask, references=sizes.ReferenceSizes(sizes.NO_SHIFT),
                      true_cfg_scale=4.0)
    assert result.size == (64, 32)
    assert result.images.shape == (1, 3, 37, 70)
    outside = (mask == 0).expand_as(result.images)
    assert torch.equal(result.images[outside], tensor[outside])  # bit for bit
    inside = (mask == 1).expand_as(result.images)
    assert (result.images[inside] - tensor[inside]).abs().mean() > 0.01  # the masked area was edited


def test_prompt_cache_hits_when_only_the_seed_changes(models):
    _, tensor = picture(48, 48, seed=30)
    calls = _Calls(models)
    try:
        first = run_edit(models, [tensor], "add a water bottle in the hand", seed=1, true_cfg_scale=4.0)
        assert calls.encodes == 2  # prompt and negative
        second = run_edit(models, [tensor], "add a water bottle in the hand", seed=2, steps=3, true_cfg_scale=2.0)
        assert calls.encodes == 2  # nothing re-encoded
        run_edit(models, [tensor], "remove the glasses", seed=2, true_cfg_scale=4.0)
        assert calls.encodes == 3  # only the new prompt
        run_edit(models, [tensor * 0.5], "remove the glasses", seed=2, true_cfg_scale=4.0)
        assert calls.encodes == 5  # another picture: both again
    finally:
        calls.close()
    assert not torch.equal(first.images, second.images)


def test_empty_negative_runs_cfg_against_a_blank_as_the_reference(models):
    _, tensor = picture(48, 48, seed=40)
    blank = run_edit(models, [tensor], negative_prompt=" ", true_cfg_scale=4.0)
    empty = run_edit(models, [tensor], negative_prompt="", true_cfg_scale=4.0)
    off = run_edit(models, [tensor], negative_prompt="", true_cfg_scale=1.0)
    assert torch.equal(blank.images, empty.images)
    assert not torch.equal(empty.images, off.images)


def test_denoise_below_one_starts_from_image_1(models):
    _, tensor = picture(48, 48, seed=41)
    light = run_edit(models, [tensor], denoise=0.3, steps=3, true_cfg_scale=1.0)
    full = run_edit(models, [tensor], denoise=1.0, steps=3, true_cfg_scale=1.0)
    assert (light.images - tensor).abs().mean() < (full.images - tensor).abs().mean()


def test_bad_inputs_are_clear_errors(models):
    _, tensor = picture(48, 48, seed=50)
    with pytest.raises(EditKitError, match="prompt is empty"):
        run_edit(models, [tensor], "   ")
    with pytest.raises(EditKitError, match="mask is 10x10 but image 1 is 48x48"):
        run_edit(models, [tensor], mask=torch.ones(1, 1, 10, 10))
    with pytest.raises(EditKitError, match="Unknown sampler"):
        from editkit.pipelines.core.sampling import SamplerSettings

        SamplerSettings(name="dpmpp_2m")


def test_wildly_different_picture_sizes_work(models):
    pictures = [picture(96, 32, seed=60)[1], picture(16, 112, seed=61)[1], picture(200, 200, seed=62)[1]]
    result = run_edit(models, pictures, "put them together", true_cfg_scale=1.0,
                      references=sizes.ReferenceSizes(sizes.NO_SHIFT, VL_AREA, VAE_AREA))
    assert result.images.shape == (1, 3, 32, 96)
    assert result.reference_sizes[0][1] == (96, 32)  # image 1 at the output size
