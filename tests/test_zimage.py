"""Z-Image-Turbo: sampling equals diffusers' pipelines, loading of every file format, clear errors.

The references are diffusers' own ``ZImagePipeline`` / ``ZImageImg2ImgPipeline`` built from the tiny
diffusers folder, given the same noise (the CPU ``torch.randn`` of the latent shape from the seed), the
same prompt embeddings and the same steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from editkit.pipelines.core import sampling as core
from editkit.pipelines.core.errors import EditKitError, ModelFileError
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.zimage import loading, sampler, text
from editkit.pipelines.zimage.family import FAMILY
from editkit.pipelines.zimage.progressive import sample_stage
from tiny import zimage as zm

F32 = torch.float32
VENDOR_COMFY = Path(__file__).resolve().parents[2] / "shared" / "vendor" / "ComfyUI"


@pytest.fixture(scope="module")
def parts(tiny_models):
    folder = tiny_models / "diffusers" / zm.FOLDER
    return {
        "root": tiny_models,
        "folder": folder,
        "transformer": loading.transformer_source(folder, None, F32).get(),
        "vae": FAMILY.vae.source(folder, None, F32).get(),
        "text": text.text_encoder_source(folder, None, F32).get(),
        "scheduler": FAMILY.scheduler_config(folder),
    }


def _pipeline(parts, cls_name="ZImagePipeline"):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(
        str(parts["folder"]), local_files_only=True, transformer=parts["transformer"].module,
        vae=parts["vae"].module, text_encoder=parts["text"].encoder.module, tokenizer=parts["text"].tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _captions(seed, lengths=(7,), width=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, generator=g) for n in lengths]


@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_text_to_image_equals_diffusers(parts, guidance_scale):
    """cfg off (guidance 0) and on (guidance 2 = EditKit cfg 3), batch of two prompts of different lengths."""
    runtime = TorchRuntime("cpu")
    pos, neg = _captions(1, (7, 12)), _captions(2, (5, 9))
    noise = core.seeded_noise((2, 16, 8, 12), 11)
    schedule = sampler.zimage_schedule(parts["scheduler"], 5)
    ours = sampler.sample(parts["transformer"], pos, noise, schedule, runtime, negative=neg,
                          cfg=sampler.cfg_from_diffusers(guidance_scale))
    with torch.inference_mode():
        theirs = _pipeline(parts)(
            prompt_embeds=pos, negative_prompt_embeds=neg, height=64, width=96, num_inference_steps=5,
            guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(11), output_type="latent",
        ).images
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    if guidance_scale == 0.0:  # without the negative branch the result must not depend on it
        again = sampler.sample(parts["transformer"], pos, noise, schedule, runtime, negative=None, cfg=1.0)
        assert torch.equal(again, ours)


def test_img2img_in_the_strength_convention_equals_diffusers(parts):
    """diffusers' convention: 10 steps at strength 0.6 run the last 6 of a 10-step schedule."""
    from diffusers.image_processor import VaeImageProcessor

    runtime = TorchRuntime("cpu")
    pos = _captions(3)
    init = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))  # model-space latent
    noise = core.seeded_noise((1, 16, 8, 8), 21)
    schedule = sampler.zimage_schedule(parts["scheduler"], 10, denoise=0.6, convention="strength")
    assert schedule.steps == 6
    ours = sampler.sample(parts["transformer"], pos, noise, schedule, runtime, init=init)
    pipe = _pipeline(parts, "ZImageImg2ImgPipeline")
    # A 16-channel "image" is taken as latents as they are (no VAE sampling), so both start from `init`.
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=16)
    with torch.inference_mode():
        theirs = pipe(image=init, prompt_embeds=pos, height=64, width=64, num_inference_steps=10, strength=0.6,
                      guidance_scale=0.0, generator=torch.Generator().manual_seed(21), output_type="latent").images
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)


def test_denoise_convention_runs_steps_calls_from_a_longer_schedule(parts):
    schedule = sampler.zimage_schedule(parts["scheduler"], 16, denoise=0.7)
    full = sampler.zimage_schedule(parts["scheduler"], int(16 / 0.7))
    assert schedule.steps == 16
    torch.testing.assert_close(schedule.sigmas, full.sigmas[-17:])
    strength = sampler.zimage_schedule(parts["scheduler"], 16, denoise=0.7, convention="strength")
    # diffusers' get_timesteps: t_start = int(16 - 16 * 0.7) = 4, so 12 calls (not int(16 * 0.7) = 11).
    assert strength.steps == 12
    torch.testing.assert_close(strength.sigmas, sampler.zimage_schedule(parts["scheduler"], 16).sigmas[4:])


def test_text_encoding_equals_diffusers(parts):
    runtime = TorchRuntime("cpu")
    pipe = _pipeline(parts)
    with torch.inference_mode():
        theirs, _ = pipe.encode_prompt(["a red fox, 35 mm"], device="cpu", do_classifier_free_guidance=False)
    ours = parts["text"].encode("a red fox, 35 mm", runtime)
    assert ours.shape == theirs[0].shape
    torch.testing.assert_close(ours, theirs[0].float(), atol=1e-5, rtol=1e-5)
    assert parts["text"].encode("a red fox, 35 mm", runtime) is ours  # cached


def test_euler_ancestral_is_reproducible_and_differs_from_euler(parts):
    runtime = TorchRuntime("cpu")

    def run(name, seed=5):
        return sample_stage(parts["transformer"], parts["vae"], parts["scheduler"], _captions(6), None, runtime,
                            width=64, height=64, seed=seed, steps=4, sampler=name)

    a, b, euler = run("euler_ancestral"), run("euler_ancestral"), run("euler")
    assert torch.equal(a, b)
    assert (a - euler).abs().max() > 1e-2
    assert (run("euler_ancestral", seed=6) - a).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------------------
# Loading


def test_comfyui_single_file_loads_the_same_weights_as_the_folder(parts):
    file = loading.transformer_source(None, parts["root"] / "diffusion_models" / zm.TRANSFORMER_FILE, F32).get()
    ours, reference = file.module.state_dict(), parts["transformer"].module.state_dict()
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key
    assert file.module.config.n_layers == 2 and file.module.config.cap_feat_dim == 16


def test_gguf_stays_quantized_and_matches_its_dequantized_weights(parts):
    from editkit.pipelines.core.diffusers_compat import dequantize_gguf_tensor

    gguf = loading.transformer_source(None, parts["root"] / "diffusion_models" / zm.GGUF_FILE, F32).get()
    assert gguf.quantized
    layer = gguf.module.layers[0].attention.to_q
    assert type(layer).__name__ == "GGUFLinear" and layer.weight.quant_type.name == "Q8_0"
    dense = parts["transformer"].module
    reference = dense.layers[0].attention.to_q.weight
    torch.testing.assert_close(dequantize_gguf_tensor(layer.weight).float(), reference, atol=2e-3, rtol=0)
    x = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))]
    cap = _captions(2)
    with torch.inference_mode():
        out = gguf.module(x, torch.tensor([0.4]), cap, return_dict=False)[0][0]
        ref = dense(x, torch.tensor([0.4]), cap, return_dict=False)[0][0]
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_qwen3_single_file_loads_the_same_encoder(parts):
    path = parts["root"] / "text_encoders" / zm.TEXT_ENCODER_FILE
    encoder = text.text_encoder_source(parts["folder"], path, F32).get()
    ours, reference = encoder.encoder.module.state_dict(), parts["text"].encoder.module.state_dict()
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], v) for k, v in reference.items())
    runtime = TorchRuntime("cpu")
    torch.testing.assert_close(encoder.encode("a boat", runtime), parts["text"].encode("a boat", runtime))


@pytest.mark.skipif(not (os.environ.get("COMFYUI_ROOT") or VENDOR_COMFY.is_dir()), reason="needs ComfyUI's files")
def test_comfyui_qwen_tokenizer_with_the_shipped_chat_format(parts):
    root = Path(os.environ.get("COMFYUI_ROOT") or VENDOR_COMFY)
    path = parts["root"] / "text_encoders" / zm.TEXT_ENCODER_FILE
    encoder = text.text_encoder_source(None, path, F32, root / "comfy" / "text_encoders" / "qwen25_tokenizer").get()
    ids = encoder.token_ids("a cat")[0].tolist()
    # Qwen's ids: <|im_start|> user \n ... <|im_end|> \n <|im_start|> assistant \n (no system prompt, no <think>)
    assert ids[:3] == [151644, 872, 198] and ids[-5:] == [151645, 198, 151644, 77091, 198]
    assert encoder.tokenizer.decode(ids) == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------------------------------
# Bad input


def test_a_flux_transformer_file_is_refused(tiny_models):
    with pytest.raises(ModelFileError, match="FLUX.1 transformer, not Z-Image"):
        loading.transformer_source(None, tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors", F32).get()


@pytest.mark.parametrize("name, what", [("t5xxl_fp16.safetensors", "T5"), ("clip_l.safetensors", "CLIP")])
def test_flux_text_encoders_are_refused_where_qwen3_is_needed(parts, name, what):
    with pytest.raises(ModelFileError, match=f"{what} text encoder.*Z-Image needs Qwen3-4B"):
        text.text_encoder_source(parts["folder"], parts["root"] / "text_encoders" / name, F32).get()


def test_flux_conditioning_is_refused():
    flux_like = [[torch.zeros(1, 512, 4096), {"pooled_output": torch.zeros(1, 768)}]]
    with pytest.raises(EditKitError, match="width 4096 \\(that is FLUX.1's T5-XXL\\).*Z-Image Text Encode"):
        text.read_conditioning(flux_like, 16)


def test_sizes_must_be_multiples_of_16_and_the_nearest_is_named():
    with pytest.raises(EditKitError, match="170x224.*nearest valid size is 176x224"):
        sampler.check_size(170, 224)


def test_truncated_transformer_file_is_a_clear_error(tmp_path, parts):
    sd = {k: v for k, v in zm.diffusers_to_comfy(parts["transformer"].module.state_dict()).items()
          if "layers.0." not in k}
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ModelFileError, match="broken.safetensors"):
        loading.transformer_source(None, path, F32).get()
