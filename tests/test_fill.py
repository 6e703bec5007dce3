"""FLUX.1-Fill sampling: equal to diffusers' FluxFillPipeline, and the node contract around it."""

from __future__ import annotations

import pytest
import torch

from editkit.pipelines.core.errors import EditKitError, Interrupted
from editkit.pipelines.core.images import match_mask_to_images
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux import fill, flow
from editkit.pipelines.flux import vae as vae_ops
from editkit.pipelines.flux.conditioning import FluxText, make_conditioning, read_conditioning
from editkit.pipelines.flux.family import FAMILY
from editkit.pipelines.flux.loading import transformer_source, vae_source

F32 = torch.float32


@pytest.fixture(scope="module")
def parts(tiny_models):
    folder = tiny_models / "diffusers" / "FLUX.1-Fill-dev"
    return {
        "folder": folder,
        "transformer": transformer_source(folder, None, F32).get(),
        "vae": vae_source(folder, None, F32).get(),
        "scheduler": FAMILY.scheduler_config(folder),
    }


def _text(batch=1, tokens=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return FluxText(torch.randn(batch, tokens, 32, generator=g), torch.randn(batch, 64, generator=g), None)


def _picture(batch=1, h=64, w=96, seed=2):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _mask(h=64, w=96, box=(16, 48, 32, 80)):
    mask = torch.zeros(1, 1, h, w)
    mask[..., box[0]:box[1], box[2]:box[3]] = 1.0
    return mask


def _fill(parts, pixels, mask, text=None, runtime=None, **kw):
    settings = dict(steps=3, guidance=30.0, seed=5, denoise=1.0, per_image=1)
    settings.update(kw)
    return fill.fill(parts["transformer"], parts["vae"], pixels, mask, text or _text(), scheduler_config=parts["scheduler"],
                     runtime=runtime or TorchRuntime("cpu"), **settings)


def test_sampler_equals_diffusers_fill_pipeline(parts, monkeypatch):
    """Same noise and prompt embeddings: diffusers builds the Fill conditioning from the same image and
    mask and denoises; the result matches ours. (diffusers samples the VAE posterior where EditKit, like
    ComfyUI, takes its mode; the test makes diffusers take the mode too.)"""
    from diffusers import FluxFillPipeline
    from diffusers.pipelines.flux import pipeline_flux_fill

    original = pipeline_flux_fill.retrieve_latents
    monkeypatch.setattr(pipeline_flux_fill, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": original(output, generator, "argmax"))

    runtime = TorchRuntime("cpu")
    pixels, mask, text = _picture(), _mask(), _text()
    cond = fill.fill_condition_tokens(parts["vae"], pixels, mask, runtime)
    noise = flow.pack(flow.noise_like((1, 16, 8, 12), seed=11))
    schedule = flow.flux_schedule(4, noise.shape[1], parts["scheduler"])
    ours = flow.denoise(parts["transformer"], flow.FlowInputs(
        noise=noise, text=text.states, pooled=text.pooled, guidance=30.0, latent_h=8, latent_w=12, cond=cond,
    ), schedule, runtime)

    pipe = FluxFillPipeline.from_pretrained(str(parts["folder"]), local_files_only=True,
                                            transformer=parts["transformer"].module, vae=parts["vae"].module)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        theirs = pipe(
            image=pixels, mask_image=mask, latents=noise, prompt_embeds=text.states,
            pooled_prompt_embeds=text.pooled, height=64, width=96, num_inference_steps=4, guidance_scale=30.0,
            output_type="latent",
        ).images
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)


def test_fill_conditioning_layout(parts):
    """Masked-picture latent, then the 8x8-folded SOFT mask (ComfyUI's convention; issue 8 changed this
    test, which used to require a binarised mask)."""
    runtime = TorchRuntime("cpu")
    pixels = _picture()
    soft = _mask() * 0.6  # > 0.5: the picture is blanked there
    cond = fill.fill_condition_tokens(parts["vae"], pixels, soft, runtime)
    assert cond.shape == (1, 4 * 6, 320)
    folded = flow.unpack(cond[..., 64:], 8, 12)  # [1, 64, 8, 12]: one channel per pixel of an 8x8 cell
    inside = torch.zeros_like(folded, dtype=torch.bool)
    inside[0, :, 2:6, 4:10] = True
    torch.testing.assert_close(folded[inside], torch.full_like(folded[inside], 0.6))
    assert folded[~inside].abs().max() == 0
    blanked = pixels * (1 - (soft > 0.5).float()) + 0.5 * (soft > 0.5).float()
    torch.testing.assert_close(flow.unpack(cond[..., :64], 8, 12), vae_ops.encode(parts["vae"], blanked, runtime))


def _soft_mask(h=64, w=96):
    """Values below, at and above 0.5: a horizontal ramp inside a box, 0 elsewhere."""
    mask = torch.zeros(1, 1, h, w)
    ramp = torch.linspace(0.05, 1.0, 48)
    mask[..., 16:48, 32:80] = ramp.view(1, 1, 1, -1)
    mask[..., 20:24, 40:44] = 0.5  # exactly 0.5: ComfyUI's round() keeps the picture there
    return mask


def _comfyui_reference_condition(vae_module, pixels, mask):
    """Fill conditioning built from ComfyUI's documented recipe, independently of EditKit's code:
    InpaintModelConditioning blanks the picture with ``1 - mask.round()`` in NHWC 0..1 and VAE-encodes it
    (here: diffusers' VAE mode, then (z - shift) * scale); the Flux Fill model folds the soft mask 8x8 with
    view(b, h/8, 8, w/8, 8).permute(0, 2, 4, 1, 3), and the 2x2 patchify packs both channel-major."""
    from diffusers import FluxFillPipeline

    nhwc = pixels.movedim(1, -1).clone()
    keep = (1.0 - mask[:, 0].round()).unsqueeze(-1)
    nhwc = (nhwc - 0.5) * keep + 0.5
    config = vae_module.config
    with torch.inference_mode():
        z = vae_module.encode(nhwc.movedim(-1, 1) * 2 - 1).latent_dist.mode()
    z = (z - config.shift_factor) * config.scaling_factor
    b, _, h, w = mask.shape
    folded = mask.view(b, h // 8, 8, w // 8, 8).permute(0, 2, 4, 1, 3).reshape(b, 64, h // 8, w // 8)
    pack = FluxFillPipeline._pack_latents
    return torch.cat([pack(z, b, 16, h // 8, w // 8), pack(folded, b, 64, h // 8, w // 8)], dim=-1)


def test_soft_mask_follows_comfyui_convention(parts):
    """The model reads the soft mask; only the masked picture uses the rounded mask (issue 8, item 3)."""
    runtime = TorchRuntime("cpu")
    pixels, mask = _picture(), _soft_mask()
    reference = _comfyui_reference_condition(parts["vae"].module, pixels, mask)
    ours = fill.fill_condition_tokens(parts["vae"], pixels, mask, runtime)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_soft_mask_sampling_equals_diffusers_given_comfyui_conditioning(parts, monkeypatch):
    """Whole fill() with a soft mask == diffusers' FluxFillPipeline whose mask preparation is replaced by the
    ComfyUI-convention conditioning, from the same noise (CPU randn of the unpacked latent shape from the seed).
    (diffusers 0.42.1's own ``masked_image_latents`` argument cannot be used: the pipeline still preprocesses
    ``image``, which must then be None.)"""
    from diffusers import FluxFillPipeline

    pixels, mask, text = _picture(), _soft_mask(), _text()
    result = _fill(parts, pixels, mask, text=text, steps=4, seed=21)
    reference = _comfyui_reference_condition(parts["vae"].module, pixels, mask)
    noise = flow.pack(torch.randn((1, 16, 8, 12), generator=torch.Generator("cpu").manual_seed(21)))
    pipe = FluxFillPipeline.from_pretrained(str(parts["folder"]), local_files_only=True,
                                            transformer=parts["transformer"].module, vae=parts["vae"].module)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(pipe, "prepare_mask_latents", lambda *args, **kwargs: (reference[..., 64:], reference[..., :64]))
    with torch.inference_mode():
        theirs = pipe(
            image=pixels, mask_image=mask, latents=noise, prompt_embeds=text.states,
            pooled_prompt_embeds=text.pooled, height=64, width=96, num_inference_steps=4, guidance_scale=30.0,
            output_type="latent",
        ).images
    torch.testing.assert_close(flow.pack(result.generated), theirs.float(), atol=1e-5, rtol=1e-5)


def test_faint_mask_is_sampled_and_seen_by_the_model(parts):
    """A mask of 0.3 runs the sampler AND reaches the model (before issue 8 the model saw an empty mask
    while the sampler still ran and blended). The short-cut and the model use the same rule."""
    runtime = TorchRuntime("cpu")
    pixels, faint = _picture(), _mask() * 0.3
    folded = flow.unpack(fill.fill_condition_tokens(parts["vae"], pixels, faint, runtime)[..., 64:], 8, 12)
    assert folded[0, :, 2:6, 4:10].min() == pytest.approx(0.3)
    assert fill.has_changes(faint) and not fill.has_changes(torch.zeros_like(faint))
    result = _fill(parts, pixels, faint)
    assert result.generated is not None  # sampled, not short-cut
    inside = (faint > 0).expand_as(pixels)
    assert (result.images - pixels).abs()[inside].mean() > 1e-3
    assert torch.equal(result.images[~inside], pixels[~inside])


def test_latent_output_is_blended_in_latent_space_without_a_second_encode(parts, monkeypatch):
    """Issue 23: the LATENT is the sampled latent where the downscaled mask is 1, the original picture's
    latent where it is 0, and bilinear mixes between (native KSampler's ``noise_mask`` rule); no VAE encode
    runs after sampling (before, the blended picture was encoded again: one extra encode per run)."""
    runtime = TorchRuntime("cpu")
    pixels, mask = _picture(), _mask()
    mask[..., 16:48, 80:88] = 0.5  # a soft band: latent cells between 0 and 1
    calls = []
    encode, denoise = vae_ops.encode, flow.denoise
    monkeypatch.setattr(vae_ops, "encode", lambda *a, **k: calls.append("encode") or encode(*a, **k))
    monkeypatch.setattr(flow, "denoise", lambda *a, **k: calls.append("denoise") or denoise(*a, **k))
    result = _fill(parts, pixels, mask, steps=2)
    assert calls.count("denoise") == 1 and "encode" not in calls[calls.index("denoise"):], calls
    monkeypatch.undo()
    original = vae_ops.encode(parts["vae"], pixels, runtime)
    cells = torch.nn.functional.interpolate(mask, size=(8, 12), mode="bilinear").expand_as(original)
    assert (cells == 1).any() and (cells == 0).any() and ((cells > 0) & (cells < 1)).any()
    torch.testing.assert_close(result.latents[cells == 1], result.generated[cells == 1], atol=0, rtol=0)
    torch.testing.assert_close(result.latents[cells == 0], original[cells == 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result.latents, result.generated * cells + original * (1 - cells),
                               atol=1e-6, rtol=1e-6)


def test_outside_the_mask_is_kept_and_batches_multiply(parts):
    pixels, mask = _picture(batch=2), _mask()
    result = _fill(parts, pixels, mask, per_image=3)
    assert result.images.shape == (6, 3, 64, 96) and result.latents.shape == (6, 16, 8, 12)
    assert 0.0 <= result.images.min() and result.images.max() <= 1.0
    expected = pixels.repeat_interleave(3, 0)
    keep = (mask == 0).expand_as(result.images)
    assert torch.equal(result.images[keep], expected[keep])
    inside = (mask == 1).expand_as(result.images)
    assert (result.images[inside] - expected[inside]).abs().mean() > 0.01
    # Each of an image's samples gets its own noise.
    assert not torch.allclose(result.latents[0], result.latents[1])


def test_seed_determinism(parts):
    pixels, mask = _picture(), _mask()
    a = _fill(parts, pixels, mask, seed=3)
    b = _fill(parts, pixels, mask, seed=3)
    c = _fill(parts, pixels, mask, seed=4)
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)


def test_empty_mask_returns_the_input(parts):
    pixels = _picture()
    result = _fill(parts, pixels, torch.zeros(1, 1, 64, 96))
    assert torch.equal(result.images, pixels)


def test_denoise_starts_later_in_the_schedule(parts):
    full = flow.flux_schedule(4, 24, parts["scheduler"], 1.0)
    half = flow.flux_schedule(4, 24, parts["scheduler"], 0.5)
    assert full.steps == half.steps == 4 and float(full.sigmas[0]) == pytest.approx(1.0)
    assert float(half.sigmas[0]) < 0.9 and float(half.sigmas[-1]) == 0.0
    pixels, mask = _picture(), _mask()
    assert _fill(parts, pixels, mask, denoise=0.5).images.shape == pixels.shape


@pytest.mark.parametrize(
    "pixels, mask, match",
    [
        (_picture(h=60), _mask(h=60), "multiples of 16"),
        (_picture(), _mask(h=48), "Mask is 96x48 but the image is 96x64"),
        (_picture(batch=3), torch.zeros(2, 1, 64, 96), "Got 2 masks for 3 images"),
    ],
)
def test_bad_sizes_give_clear_errors(parts, pixels, mask, match):
    with pytest.raises(EditKitError, match=match):
        _fill(parts, pixels, mask)


def test_wrong_transformer_is_refused(tiny_models, parts):
    from editkit.pipelines.flux.kontext_inpaint import widen_fill_transformer

    widened = transformer_source(None, tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors", F32)
    component = widened.derived("test-widened", lambda c: (widen_fill_transformer(c.module), c)[1], "w").get()
    with pytest.raises(EditKitError, match="needs a transformer with 384 input features.*192"):
        fill.fill(component, parts["vae"], _picture(), _mask(), _text(), steps=1, guidance=30, seed=0, denoise=1,
                  per_image=1, scheduler_config=parts["scheduler"], runtime=TorchRuntime("cpu"))


def test_interrupt_stops_between_steps(parts):
    calls = []

    def on_progress(value, total, preview):
        calls.append(value)
        if value == 2:
            runtime.interrupt()

    runtime = TorchRuntime("cpu", on_progress=on_progress)
    with pytest.raises(Interrupted):
        _fill(parts, _picture(), _mask(), runtime=runtime, steps=5)
    assert calls == [1, 2]


def test_previews_are_model_space_latents(parts):
    shapes = []
    runtime = TorchRuntime("cpu", on_progress=lambda v, t, preview: shapes.append(tuple(preview().shape)))
    _fill(parts, _picture(), _mask(), runtime=runtime, steps=2)
    assert shapes == [(1, 16, 8, 12)] * 2


def test_previews_are_the_x0_estimate_unpacked_in_model_space():
    """With a constant velocity c, step i is at x_i = noise + (sigma_i - 1) c, so the x0 estimate x_i - sigma_i c
    is noise - c at every step: each preview must be exactly that, for the first sample only, unpacked to
    [1,16,h,w] the way diffusers unpacks Flux latents, with no VAE scale/shift applied (model space, what
    ComfyUI's Flux latent format previews). A preview of x_i instead of x0, of packed tokens, of another sample
    or in raw VAE space fails."""
    from diffusers import FluxPipeline

    from editkit.pipelines.core.runtime import Component

    velocity = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(3))

    class ConstantVelocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.config = type("Config", (), {"guidance_embeds": True, "in_channels": 384})()

        def forward(self, hidden_states, **kwargs):
            return (velocity.expand(hidden_states.shape[0], -1, -1).clone(),)

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True,
              "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    schedule = flow.flux_schedule(3, 24, config, denoise=1.0)
    noise = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(4))
    previews = []
    runtime = TorchRuntime("cpu", on_progress=lambda v, t, preview: previews.append(preview().clone()))
    inputs = flow.FlowInputs(noise=noise, text=torch.zeros(2, 3, 8), pooled=torch.zeros(2, 8), guidance=1.0,
                             latent_h=8, latent_w=12)
    flow.denoise(Component(ConstantVelocity(), "diffusion", "stub", F32), inputs, schedule, runtime)
    expected = FluxPipeline._unpack_latents(noise[:1] - velocity, 64, 96, 8)  # 64x96 pixels, VAE factor 8
    assert len(previews) == 3
    for preview in previews:
        assert preview.shape == (1, 16, 8, 12)
        torch.testing.assert_close(preview, expected, atol=1e-6, rtol=1e-6)


def test_outpaint_canvas_is_exact_and_feathers_only_extended_sides():
    """The canvas is exactly the size asked for; only the extended sides get a feather band (issue 8
    changed this test: the canvas used to be rounded up to 16 with the extra pixels repainted)."""
    pixels = torch.rand(1, 3, 50, 40)
    canvas, mask = fill.outpaint_canvas(pixels, left=8, top=0, right=10, bottom=0, feathering=6)
    assert canvas.shape == (1, 3, 50, 58) and mask.shape == (1, 1, 50, 58)
    assert torch.equal(canvas[..., 8:48], pixels)
    assert mask[0, 0, 10, 0] == 1 and mask[0, 0, 10, 57] == 1  # new columns
    ramp = mask[0, 0, 10, 8:16]
    assert torch.all(ramp[1:] <= ramp[:-1]) and 0 < ramp[0] < 1 and ramp[-1] == 0  # feathered into the original
    assert mask[0, 0, :, 14:42].max() == 0  # top and bottom were not extended: no band there
    assert mask.min() >= 0 and mask.max() <= 1


def test_outpaint_feathering_is_clamped_to_the_picture():
    """A huge feathering on a small picture leaves the middle of the original untouched."""
    pixels = torch.rand(1, 3, 32, 48)
    _, mask = fill.outpaint_canvas(pixels, left=16, top=0, right=16, bottom=0, feathering=512)
    original = mask[0, 0, :, 16:64]
    assert original[:, 23:25].max() == 0  # the centre columns of the 48-wide original
    assert original[:, 0].min() > 0.9  # still a strong band at the seam
    _, tall = fill.outpaint_canvas(pixels, left=0, top=0, right=0, bottom=8, feathering=512)
    assert tall[0, 0, :15].max() == 0 and tall[0, 0, 31].min() > 0  # at most half of the 32 rows


def test_outpaint_returns_exactly_the_canvas_asked_for(parts):
    """500x512 extended at the bottom by 64: 500x576 back, nothing along the untouched right edge repainted
    (issue 8: it came back 512 wide with a feather band down the whole right edge)."""
    pixels = torch.rand(1, 3, 512, 500, generator=torch.Generator().manual_seed(8))
    result, mask = fill.outpaint(parts["transformer"], parts["vae"], pixels, _text(), left=0, top=0, right=0,
                                 bottom=64, feathering=24, steps=1, guidance=30.0, seed=2, denoise=1.0, per_image=1,
                                 scheduler_config=parts["scheduler"], runtime=TorchRuntime("cpu"))
    assert result.images.shape == (1, 3, 576, 500) and mask.shape == (1, 1, 576, 500)
    assert result.latents.shape == (1, 16, 72, 63)  # ceil(576 / 8) x ceil(500 / 8) cells
    original_mask = mask[0, 0, :512]
    assert original_mask[:, -1][:512 - 24].max() == 0  # the original right edge, above the bottom band
    assert original_mask[: 512 - 24].max() == 0 and (original_mask > 0.5).sum() <= 500 * 12
    assert mask[0, 0, 512:].min() == 1
    kept = (mask[:, :, :512] == 0).expand(-1, 3, -1, -1)
    assert torch.equal(result.images[:, :, :512][kept], pixels[kept])


def test_pad_to_multiple_repeats_the_edge():
    x = torch.arange(2 * 1 * 5 * 7, dtype=torch.float32).view(2, 1, 5, 7)
    padded = fill.pad_to_multiple(x, 4)
    assert padded.shape == (2, 1, 8, 8)
    assert torch.equal(padded[..., :5, :7], x) and torch.equal(padded[..., 7, :7], x[..., 4, :])
    assert fill.pad_to_multiple(padded, 4) is padded


def test_load_image_empty_mask_gets_a_paint_a_mask_error(parts):
    """Load Image's 64x64 zero mask with a bigger picture: say what to do, not that sizes differ (issue 8)."""
    from editkit.nodes.flux_nodes import EditKitFluxFillInpaint

    with pytest.raises(EditKitError, match="(?i)paint a mask or load a picture with transparency") as info:
        EditKitFluxFillInpaint().inpaint(None, None, None, torch.rand(1, 768, 768, 3), torch.zeros(1, 64, 64),
                                         seed=0, steps=1, guidance=30.0, denoise=1.0, batch_size=1)
    assert "64x64" in str(info.value) and "768" not in str(info.value)
    # A painted (non-zero) 64x64 mask of the wrong size is still a size error, and a 64x64 picture may have
    # an empty mask (then nothing is repainted).
    painted = torch.zeros(1, 1, 64, 64)
    painted[..., 3, 3] = 1
    with pytest.raises(EditKitError, match="Mask is 64x64 but the image is 768x768"):
        match_mask_to_images(painted, torch.rand(1, 3, 768, 768))
    small = torch.rand(1, 3, 64, 64)
    assert torch.equal(_fill(parts, small, torch.zeros(1, 1, 64, 64)).images, small)


def test_errors_read_as_class_names_in_comfyui(parts):
    """ComfyUI reports ``exception_type`` as module + qualname, and imports the pack under its folder path:
    EditKit's errors must still read as class names (issue 8, item 9)."""
    with pytest.raises(EditKitError) as info:
        _fill(parts, _picture(h=60), _mask(h=60))
    cls = type(info.value)
    assert f"{cls.__module__}.{cls.__qualname__}" == "editkit.EditKitError"
    assert f"{Interrupted.__module__}.{Interrupted.__qualname__}" == "editkit.Interrupted"


def test_seed_tooltip_does_not_promise_identical_pictures_across_gpus():
    from editkit.nodes.flux_nodes import EditKitFluxFillInpaint

    tooltip = EditKitFluxFillInpaint.INPUT_TYPES()["required"]["seed"][1]["tooltip"]
    assert "same noise" in tooltip and "not bit for bit" in tooltip


def test_conditioning_from_native_nodes_is_accepted():
    states, pooled = torch.randn(1, 256, 32), torch.randn(1, 64)
    native = [[states, {"pooled_output": pooled, "guidance": 3.5}]]  # CLIPTextEncode + FluxGuidance
    text = read_conditioning(native, 32, 64)
    assert text.guidance == 3.5 and text.states.shape == (1, 256, 32)
    zeroed = [[torch.zeros_like(states), {"pooled_output": torch.zeros_like(pooled)}]]  # ConditioningZeroOut
    assert read_conditioning(zeroed, 32, 64).states.abs().max() == 0
    ours = make_conditioning(states, pooled)
    assert set(ours[0][1]) == {"pooled_output"}
    with pytest.raises(EditKitError, match="no pooled_output"):
        read_conditioning([[states, {}]], 32, 64)
    with pytest.raises(EditKitError, match="width 768.*expects 32"):
        read_conditioning([[torch.randn(1, 77, 768), {"pooled_output": pooled}]], 32, 64)


class _ZeroVelocity(torch.nn.Module):
    """A stand-in transformer that predicts zero velocity: the sampler then returns its start point."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"guidance_embeds": True, "in_channels": 384})()

    def forward(self, hidden_states, **kwargs):
        return (torch.zeros(*hidden_states.shape[:2], 64),)


def test_img2img_starts_from_the_noised_input():
    """denoise < 1 starts at sigma0 * noise + (1 - sigma0) * init (ComfyUI's and diffusers' img2img)."""
    from editkit.pipelines.core.runtime import Component

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True,
              "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    schedule = flow.flux_schedule(4, 24, config, denoise=0.4)
    sigma0 = float(schedule.sigmas[0])
    noise, init = torch.randn(1, 24, 64), torch.randn(1, 24, 64)
    inputs = flow.FlowInputs(noise=noise, text=torch.zeros(1, 3, 8), pooled=torch.zeros(1, 8), guidance=1.0,
                             latent_h=4, latent_w=6, init=init)
    out = flow.denoise(Component(_ZeroVelocity(), "diffusion", "stub", F32), inputs, schedule, TorchRuntime("cpu"))
    torch.testing.assert_close(out, sigma0 * noise + (1 - sigma0) * init)
    assert 0.0 < sigma0 < 0.95


def test_last_preview_is_the_result(parts):
    """Previews are the x0 estimate x - sigma * v: after the last step that is the final latent."""
    previews = []
    runtime = TorchRuntime("cpu", on_progress=lambda v, t, preview: previews.append(preview()))
    result = _fill(parts, _picture(batch=2), _mask(), runtime=runtime, steps=3)
    assert len(previews) == 3 and previews[-1].shape == (1, 16, 8, 12)  # ComfyUI previews the first sample
    torch.testing.assert_close(previews[-1], result.generated[:1], atol=1e-5, rtol=1e-5)


def test_vae_retries_in_tiles_after_running_out_of_memory(parts, monkeypatch):
    """The latent is larger than the retry's tile, so the retry really tiles: the VAE's own tiled decoder runs
    and the decoder sees only overlapping tiles. (The tile is shrunk from 512 to 64 pixels = 8 latent rows, so
    the test decodes a 96-pixel picture instead of a 576-pixel one.)"""
    vae = parts["vae"]
    monkeypatch.setattr(vae_ops, "_TILE_PIXELS", 64)
    latents = torch.randn(2, 16, 12, 6, generator=torch.Generator().manual_seed(6))  # 12 rows > 8-row tile
    untiled = vae_ops.decode(vae, latents[:1], TorchRuntime("cpu"))
    module_type = type(vae.module)
    original, original_tiled = module_type._decode, module_type.tiled_decode
    calls, tiles = [], []

    def plain_decode(module, z, *args, **kwargs):
        calls.append((module.use_tiling, tuple(z.shape[-2:])))
        if not module.use_tiling:
            raise torch.OutOfMemoryError("simulated")
        return original(module, z, *args, **kwargs)

    def tiled_decode(module, z, *args, **kwargs):
        tiles.append(tuple(z.shape))
        return original_tiled(module, z, *args, **kwargs)

    monkeypatch.setattr(module_type, "_decode", plain_decode)
    monkeypatch.setattr(module_type, "tiled_decode", tiled_decode)
    decoded_tiles = []
    hook = vae.module.decoder.register_forward_pre_hook(lambda _m, args: decoded_tiles.append(tuple(args[0].shape)))
    try:
        out = vae_ops.decode(vae, latents, TorchRuntime("cpu"))
    finally:
        hook.remove()
    assert out.shape == (2, 3, 96, 48)
    assert calls[0] == (False, (12, 6))  # the whole latent first: out of memory
    assert tiles == [(1, 16, 12, 6), (1, 16, 12, 6)]  # then one picture at a time, through the tiled decoder
    # 8-row tiles with a quarter overlap: rows 0-7 and 6-11 of each picture, never the whole latent at once.
    assert decoded_tiles == [(1, 16, 8, 6), (1, 16, 6, 6)] * 2
    assert vae.module.use_tiling is False  # the user's setting is restored
    # Tiles blend at their seams, so the picture is close to, not equal to, the untiled decode.
    assert (out[:1] - untiled).abs().mean() < 0.05, (out[:1] - untiled).abs().mean()
