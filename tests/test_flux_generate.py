"""FLUX.1-dev generation: equal to diffusers' FluxPipeline / FluxImg2ImgPipeline, and the node around it."""

from __future__ import annotations

import pytest
import torch

from editkit.nodes.flux_generate_nodes import EditKitFluxSampler
from editkit.nodes.flux_nodes import EditKitFluxLoader
from editkit.pipelines.core import sampling as core
from editkit.pipelines.core.errors import EditKitError
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux import flow
from editkit.pipelines.flux import generate as gen
from editkit.pipelines.flux import vae as vae_ops
from editkit.pipelines.flux.conditioning import FluxText, make_conditioning
from editkit.pipelines.flux.family import FAMILY
from editkit.pipelines.flux.loading import transformer_source, vae_source
from node_calls import call_node

F32 = torch.float32


@pytest.fixture(scope="module")
def parts(tiny_models):
    folder = tiny_models / "diffusers" / "FLUX.1-Fill-dev"
    return {
        "transformer": transformer_source(None, tiny_models / "diffusion_models" / "flux1-dev.safetensors", F32).get(),
        "vae": vae_source(folder, None, F32).get(),
        "scheduler": FAMILY.scheduler_config(folder),
    }


def _text(tokens=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return FluxText(torch.randn(1, tokens, 32, generator=g), torch.randn(1, 64, generator=g), None)


def _pipe(cls, parts):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler.from_config(parts["scheduler"]), vae=parts["vae"].module,
               text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
               transformer=parts["transformer"].module)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(parts, text, **kw):
    settings = dict(steps=4, guidance=3.5, seed=11)
    width, height = kw.pop("width", 96), kw.pop("height", 64)
    settings.update({k: kw.pop(k) for k in list(kw) if k in gen.GenerateSettings.__dataclass_fields__})
    return gen.generate(parts["transformer"], parts["vae"], text, width=width, height=height,
                        settings=gen.GenerateSettings(**settings), scheduler_config=parts["scheduler"],
                        runtime=TorchRuntime("cpu"), **kw)


def test_text_to_image_equals_flux_pipeline(parts):
    from diffusers import FluxPipeline

    text = _text()
    ours = _ours(parts, text)
    noise = flow.pack(core.seeded_noise((1, 16, 8, 12), 11))
    with torch.inference_mode():
        theirs = _pipe(FluxPipeline, parts)(
            prompt_embeds=text.states, pooled_prompt_embeds=text.pooled, latents=noise, height=64, width=96,
            num_inference_steps=4, guidance_scale=3.5, output_type="latent",
        ).images
    torch.testing.assert_close(flow.pack(ours.latents), theirs.float(), atol=1e-5, rtol=1e-5)


def test_true_cfg_equals_flux_pipeline(parts):
    from diffusers import FluxPipeline

    text, negative = _text(seed=1), _text(seed=2)
    ours = _ours(parts, text, negative=negative, cfg_scale=3.0)
    noise = flow.pack(core.seeded_noise((1, 16, 8, 12), 11))
    with torch.inference_mode():
        theirs = _pipe(FluxPipeline, parts)(
            prompt_embeds=text.states, pooled_prompt_embeds=text.pooled, negative_prompt_embeds=negative.states,
            negative_pooled_prompt_embeds=negative.pooled, true_cfg_scale=3.0, latents=noise, height=64, width=96,
            num_inference_steps=4, guidance_scale=3.5, output_type="latent",
        ).images
    torch.testing.assert_close(flow.pack(ours.latents), theirs.float(), atol=1e-5, rtol=1e-5)
    # and CFG really acted: not the plain run
    assert not torch.allclose(ours.latents, _ours(parts, text).latents, atol=1e-3)


def test_image_to_image_equals_flux_img2img_pipeline_in_the_strength_convention(parts, monkeypatch):
    """diffusers samples the VAE posterior where EditKit, like ComfyUI, takes its mode; the test makes
    diffusers take the mode too. The noise is then the same seeded CPU draw."""
    from diffusers import FluxImg2ImgPipeline
    from diffusers.pipelines.flux import pipeline_flux_img2img

    original = pipeline_flux_img2img.retrieve_latents
    monkeypatch.setattr(pipeline_flux_img2img, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": original(output, generator, "argmax"))
    text = _text()
    pixels = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    init = vae_ops.encode(parts["vae"], pixels, TorchRuntime("cpu"))
    ours = _ours(parts, text, init_latents=init, steps=10, denoise=0.6, convention="strength")
    with torch.inference_mode():
        theirs = _pipe(FluxImg2ImgPipeline, parts)(
            image=pixels, strength=0.6, prompt_embeds=text.states, pooled_prompt_embeds=text.pooled, height=64,
            width=96, num_inference_steps=10, guidance_scale=3.5, output_type="latent",
            generator=torch.Generator("cpu").manual_seed(11),
        ).images
    torch.testing.assert_close(flow.pack(ours.latents), theirs.float(), atol=1e-5, rtol=1e-5)


def test_wrong_transformer_and_sizes_are_clear(parts, tiny_models):
    fill = transformer_source(tiny_models / "diffusers" / "FLUX.1-Fill-dev", None, F32).get()
    with pytest.raises(EditKitError, match="needs a transformer with 64 input features.*FLUX.1-Fill"):
        gen.generate(fill, parts["vae"], _text(), width=64, height=64, settings=gen.GenerateSettings(),
                     scheduler_config=parts["scheduler"], runtime=TorchRuntime("cpu"))
    with pytest.raises(EditKitError, match="multiples of 16.*width 1000 → 992"):
        _ours(parts, _text(), width=1000)


@pytest.fixture()
def dev_loader(models_root, torch_runtime):
    return call_node(EditKitFluxLoader, diffusers_folder="FLUX.1-Fill-dev", transformer_file="flux1-dev.safetensors",
                     vae_file="ae.safetensors", weight_dtype="fp32")


def test_node_text_to_image_batch_and_latent_agree(dev_loader):
    model, _text_encoders, vae = dev_loader
    t = _text()
    image, latent = call_node(EditKitFluxSampler, model=model, vae=vae, conditioning=make_conditioning(t.states, t.pooled),
                              width=96, height=64, steps=2, batch_size=2, seed=5)
    assert image.shape == (2, 64, 96, 3) and latent["samples"].shape == (2, 16, 8, 12)
    assert not torch.allclose(image[0], image[1])
    vae_c = vae.get()
    decoded = vae_ops.decode(vae_c, vae_ops.raw_to_model(vae_c, latent["samples"]), TorchRuntime("cpu"))
    torch.testing.assert_close(decoded.permute(0, 2, 3, 1), image, atol=1e-5, rtol=1e-5)
    again, _ = call_node(EditKitFluxSampler, model=model, vae=vae, conditioning=make_conditioning(t.states, t.pooled),
                         width=96, height=64, steps=2, batch_size=2, seed=5, sampler="euler_ancestral")
    assert not torch.allclose(again, image)


def test_node_image_to_image_keeps_the_picture_size(dev_loader):
    model, _text_encoders, vae = dev_loader
    t = _text()
    start = torch.rand(1, 48, 80, 3)
    image, latent = call_node(EditKitFluxSampler, model=model, vae=vae, conditioning=make_conditioning(t.states, t.pooled),
                              image=start, denoise=0.5, steps=2)
    assert image.shape == (1, 48, 80, 3)
    from_latent, _ = call_node(EditKitFluxSampler, model=model, vae=vae,
                               conditioning=make_conditioning(t.states, t.pooled), latent=latent, denoise=0.5, steps=2)
    assert from_latent.shape == (1, 48, 80, 3)


def test_node_bad_input(dev_loader):
    model, _text_encoders, vae = dev_loader
    t = _text()
    cond = make_conditioning(t.states, t.pooled)
    other_family = make_conditioning(torch.zeros(1, 7, 3584), torch.zeros(1, 64))
    with pytest.raises(EditKitError, match="negative was encoded to width 3584, but this transformer expects 32"):
        call_node(EditKitFluxSampler, model=model, vae=vae, conditioning=cond, negative=other_family, cfg=2.0,
                  width=64, height=64, steps=1)
    with pytest.raises(EditKitError, match="Unknown sampler 'lms'"):
        call_node(EditKitFluxSampler, model=model, vae=vae, conditioning=cond, sampler="lms", width=64, height=64)
    with pytest.raises(EditKitError, match="denoise must be greater than 0"):
        call_node(EditKitFluxSampler, model=model, vae=vae, conditioning=cond, denoise=0.0, width=64, height=64)
    with pytest.raises(EditKitError, match="height 72 → 80|height 72 → 64"):
        call_node(EditKitFluxSampler, model=model, vae=vae, conditioning=cond, width=64, height=72)
    with pytest.raises(EditKitError, match=r"\(1, 16, 1, 4, 4\) \(a Qwen-Image / Wan latent\).*16-channel FLUX.1-VAE"):
        call_node(EditKitFluxSampler, model=model, vae=vae, conditioning=cond, latent={"samples": torch.zeros(
            1, 16, 1, 4, 4)}, denoise=0.5)


def test_schnell_from_single_files_uses_its_static_shift(parts):
    from types import SimpleNamespace

    schnell = SimpleNamespace(module=SimpleNamespace(config=SimpleNamespace(guidance_embeds=False)))
    assert gen.schedule_config_for(schnell, parts["scheduler"]) == gen.SCHNELL_SCHEDULER
    assert gen.schedule_config_for(parts["transformer"], parts["scheduler"]) is parts["scheduler"]
    folder_config = {**gen.SCHNELL_SCHEDULER, "shift": 1.5}
    assert gen.schedule_config_for(schnell, folder_config) is folder_config
