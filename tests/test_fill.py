"""FLUX.1-Fill sampling: equal to diffusers' FluxFillPipeline, and the node contract around it."""

from __future__ import annotations

import pytest
import torch

from editkit.pipelines.core.errors import EditKitError, Interrupted
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux import fill, flow
from editkit.pipelines.flux import vae as vae_ops
from editkit.pipelines.flux.conditioning import FluxText, make_conditioning, read_conditioning
from editkit.pipelines.flux.loading import scheduler_config, transformer_source, vae_source

F32 = torch.float32


@pytest.fixture(scope="module")
def parts(tiny_models):
    folder = tiny_models / "diffusers" / "FLUX.1-Fill-dev"
    return {
        "folder": folder,
        "transformer": transformer_source(folder, None, F32).get(),
        "vae": vae_source(folder, None, F32).get(),
        "scheduler": scheduler_config(folder),
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
    """Masked-image latent then the 8x8-folded binarised mask, as FLUX.1-Fill was trained."""
    runtime = TorchRuntime("cpu")
    pixels = _picture()
    soft = _mask() * 0.6  # > 0.5 counts as masked
    cond = fill.fill_condition_tokens(parts["vae"], pixels, soft, runtime)
    assert cond.shape == (1, 4 * 6, 320)
    folded = flow.unpack(cond[..., 64:], 8, 12)  # [1, 64, 8, 12]: one channel per pixel of an 8x8 cell
    assert set(folded.unique().tolist()) == {0.0, 1.0}
    assert folded[0, :, 2:6, 4:10].min() == 1 and folded[0, :, :2].max() == 0
    blanked = pixels * (1 - (soft > 0.5).float()) + 0.5 * (soft > 0.5).float()
    torch.testing.assert_close(flow.unpack(cond[..., :64], 8, 12), vae_ops.encode(parts["vae"], blanked, runtime))


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


def test_outpaint_canvas_rounds_to_16_and_feathers():
    pixels = torch.rand(1, 3, 50, 40)
    canvas, mask, pads = fill.outpaint_canvas(pixels, left=8, top=0, right=10, bottom=0, feathering=6)
    left, top, right, bottom = pads
    assert canvas.shape[-2:] == (64, 64) and (left, top) == (8, 0) and right >= 10 and bottom == 14
    assert torch.equal(canvas[..., :50, 8:48], pixels)
    assert mask[0, 0, 10, 0] == 1 and mask[0, 0, 10, 60] == 1  # new columns
    ramp = mask[0, 0, 10, 8:16]
    assert torch.all(ramp[1:] <= ramp[:-1]) and 0 < ramp[0] < 1 and ramp[-1] == 0  # feathered into the original
    assert mask[0, 0, 60, 30] == 1  # rows added at the bottom to reach a multiple of 16
    assert mask.min() >= 0 and mask.max() <= 1


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
    torch.testing.assert_close(previews[-1], result.latents[:1], atol=1e-5, rtol=1e-5)


def test_vae_retries_in_tiles_after_running_out_of_memory(parts, monkeypatch):
    vae = parts["vae"]
    untiled = vae_ops.decode(vae, torch.randn(2, 16, 8, 12), TorchRuntime("cpu"))
    original = type(vae.module).decode
    calls = []

    def decode(module, z, *args, **kwargs):
        calls.append(module.use_tiling)
        if not module.use_tiling:
            raise torch.OutOfMemoryError("simulated")
        return original(module, z, *args, **kwargs)

    monkeypatch.setattr(type(vae.module), "decode", decode)
    latents = torch.randn(2, 16, 8, 12)
    out = vae_ops.decode(vae, latents, TorchRuntime("cpu"))
    assert out.shape == untiled.shape == (2, 3, 64, 96)
    assert calls == [False, True, True] and vae.module.use_tiling is False  # one failed try, then 1 by 1 tiled
