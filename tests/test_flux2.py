"""FLUX.2 [klein]: sampling equals diffusers' pipelines, every loading path, inpaint blend-back, LoRA, clear errors.

The references are diffusers' own ``Flux2KleinPipeline`` / ``Flux2KleinInpaintPipeline`` built from the tiny
diffusers folder, given the same noise (the CPU ``torch.randn`` of the packed-latent shape from the seed, which is
what EditKit draws), the same prompt and the same steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.pipelines.core.errors import EditKitError, ModelFileError
from editkit.pipelines.core.lora import add_lora
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux2 import inpaint as fi
from editkit.pipelines.flux2 import latent as fl
from editkit.pipelines.flux2 import loading, sampler, text
from editkit.pipelines.flux2.family import FAMILY
from editkit.pipelines.flux2.lora import FLUX2_LORA
from editkit.pipelines.zimage.text import text_encoder_source
from tiny import flux2 as fm

F32 = torch.float32
PROMPT = "a red fox in the snow"
LAYERS = (1, 2, 3)  # the tiny encoder's 4 layers: klein's quarter points


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("flux2_tree")
    paths = fm.FAMILY.tree(out)["paths"]  # shared with test_tiny_models in one process
    return out, paths


@pytest.fixture(scope="module")
def parts(tree):
    _, paths = tree
    folder = paths["flux2_folder"]
    return {
        "folder": folder,
        "model": loading.Flux2Model(loading.transformer_source(folder, None, F32), FAMILY.scheduler_config(folder),
                                    loading.is_distilled(folder)),
        "vae": loading.vae_source(folder, None, F32).get(),
        "text": text_encoder_source(folder, None, F32, wrapper=text.Flux2TextEncoder).get(),
    }


def _pipe(parts, cls="Flux2KleinPipeline", distilled=True):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(
        str(parts["folder"]), local_files_only=True, transformer=parts["model"].transformer.get().module,
        vae=parts["vae"].module, is_distilled=distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _picture(seed, width, height):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _tensor(picture):
    return torch.from_numpy(np.asarray(picture).astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


def _embeds(parts, prompt=PROMPT):
    return parts["text"].encode(prompt, TorchRuntime("cpu")).unsqueeze(0)


def test_prompt_features_equal_diffusers(parts):
    """Padded to 512 tokens, layers stacked per token: exactly what the pipeline's encode_prompt returns."""
    ours = _embeds(parts)
    pipe = _pipe(parts)
    with torch.inference_mode():
        theirs, _ = pipe.encode_prompt(PROMPT, device="cpu", text_encoder_out_layers=LAYERS)
    assert ours.shape == (1, 512, 48)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-6)
    assert text.feature_layers(36) == (9, 18, 27)


@pytest.mark.parametrize("steps,batch", [(4, 1), (3, 2)])
def test_text_to_image_equals_diffusers(parts, steps, batch):
    runtime = TorchRuntime("cpu")
    embeds = _embeds(parts)
    ours = sampler.generate(parts["model"], parts["vae"], embeds, runtime, width=64, height=48, seed=7, steps=steps,
                            batch_size=batch)
    with torch.inference_mode():
        theirs = _pipe(parts)(prompt_embeds=embeds, height=48, width=64, num_inference_steps=steps,
                              num_images_per_prompt=batch, generator=torch.Generator().manual_seed(7),
                              output_type="latent").images
    assert ours.shape == (batch, 32, 6, 8)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)


def test_true_cfg_of_the_base_models_equals_diffusers(parts):
    runtime = TorchRuntime("cpu")
    embeds, negative = _embeds(parts), _embeds(parts, "")
    ours = sampler.generate(parts["model"], parts["vae"], embeds, runtime, width=48, height=48, seed=3, steps=3,
                            negative=negative, cfg=2.5)
    with torch.inference_mode():
        theirs = _pipe(parts, distilled=False)(prompt_embeds=embeds, negative_prompt_embeds=negative, height=48,
                                               width=48, num_inference_steps=3, guidance_scale=2.5,
                                               generator=torch.Generator().manual_seed(3), output_type="latent").images
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    plain = sampler.generate(parts["model"], parts["vae"], embeds, runtime, width=48, height=48, seed=3, steps=3)
    assert (plain - ours).abs().max() > 1e-3  # the negative branch really ran


@pytest.mark.parametrize("sizes", [[(80, 64)], [(64, 64), (64, 96), (96, 64)]], ids=["1 reference", "3 references"])
def test_edit_with_references_equals_diffusers(parts, sizes):
    """Each reference keeps its own size; the output takes the first one's when width/height are not given."""
    runtime = TorchRuntime("cpu")
    pictures = [_picture(10 + k, w, h) for k, (w, h) in enumerate(sizes)]
    embeds = _embeds(parts)
    width, height = sizes[0]
    ours = sampler.generate(parts["model"], parts["vae"], embeds, runtime, width=width, height=height, seed=5,
                            steps=3, references=[_tensor(p) for p in pictures])
    with torch.inference_mode():
        theirs = _pipe(parts)(prompt_embeds=embeds, image=pictures, num_inference_steps=3,
                              generator=torch.Generator().manual_seed(5), output_type="latent").images
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    alone = sampler.generate(parts["model"], parts["vae"], embeds, runtime, width=width, height=height, seed=5,
                             steps=3)
    assert (alone - ours).abs().max() > 1e-3  # the references really reach the model


def _mask_picture(width, height, box):
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask, mode="L")


@pytest.mark.parametrize("strength,reference", [(1.0, False), (0.75, False), (1.0, True)],
                         ids=["full", "strength 0.75", "with a reference"])
def test_inpaint_equals_diffusers(parts, strength, reference):
    runtime = TorchRuntime("cpu")
    source, mask = _picture(1, 80, 64), _mask_picture(80, 64, (16, 16, 48, 40))
    extra = _picture(2, 64, 64) if reference else None
    embeds = _embeds(parts)
    masks = fi.read_mask(torch.from_numpy(np.asarray(mask).astype(np.float32) / 255.0), 1, 64, 80)
    ours = fi.inpaint_latent(parts["model"], parts["vae"], embeds, runtime, _tensor(source), masks, seed=9, steps=4,
                             denoise=strength, references=[_tensor(extra)] if reference else None)
    with torch.inference_mode():
        theirs = _pipe(parts, "Flux2KleinInpaintPipeline")(
            prompt_embeds=embeds, image=source, mask_image=mask, image_reference=extra, strength=strength,
            num_inference_steps=4, generator=torch.Generator().manual_seed(9), output_type="latent").images
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)


def test_inpaint_returns_every_pixel_outside_the_mask_exactly(parts):
    runtime = TorchRuntime("cpu")
    image = _tensor(_picture(4, 48, 32)).permute(0, 2, 3, 1)  # ComfyUI IMAGE [1, H, W, 3]
    mask = torch.zeros(32, 48)
    mask[8:24, 16:40] = 1.0
    mask[8:24, 12:16] = 0.5  # a soft edge
    out, raw = fi.inpaint(parts["model"], parts["vae"], _embeds(parts), runtime, image, mask, seed=1, steps=2)
    assert out.shape == image.shape and raw.shape == (1, 32, 4, 6)
    outside = mask == 0
    assert torch.equal(out[0][outside], image[0][outside])
    assert (out[0][mask == 1] - image[0][mask == 1]).abs().max() > 1e-3  # the masked area was repainted
    nothing, _ = fi.inpaint(parts["model"], parts["vae"], _embeds(parts), runtime, image, torch.zeros(32, 48))
    assert torch.equal(nothing, image)


def test_inpaint_refuses_a_mask_of_another_size():
    with pytest.raises(EditKitError, match="mask is 32x32 but the picture is 48x32"):
        fi.read_mask(torch.zeros(1, 32, 32), 1, 32, 48)


def test_latent_format_round_trips_and_uses_the_vae_statistics(parts):
    raw = torch.randn(2, 32, 6, 8)
    model = fl.raw_to_model(parts["vae"], raw)
    assert model.shape == (2, 128, 3, 4)
    torch.testing.assert_close(fl.model_to_raw(parts["vae"], model), raw, atol=1e-5, rtol=1e-5)
    bn = parts["vae"].module.bn
    expected = (fl.patchify(raw) - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1)
                                                                                  + 1e-4)
    torch.testing.assert_close(model, expected, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Loading


def _state(module):
    return {k: v.float() for k, v in module.state_dict().items()}


def test_single_file_transformer_in_bfl_layout_equals_the_folder(tree, parts):
    _, paths = tree
    single = loading.transformer_source(None, paths["flux2_file"], F32).get()
    reference = _state(parts["model"].transformer.get().module)
    ours = _state(single.module)
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key
    assert single.module.config.joint_attention_dim == 48 and single.module.config.num_single_layers == 2


def test_gguf_transformer_gives_the_folder_picture_within_q8_rounding(tree, parts):
    _, paths = tree
    runtime = TorchRuntime("cpu")
    gguf = loading.Flux2Model(loading.transformer_source(None, paths["flux2_gguf"], F32),
                              FAMILY.scheduler_config(None))
    assert gguf.transformer.get().quantized
    embeds = _embeds(parts)
    a = sampler.generate(gguf, parts["vae"], embeds, runtime, width=32, height=32, seed=2, steps=2)
    b = sampler.generate(parts["model"], parts["vae"], embeds, runtime, width=32, height=32, seed=2, steps=2)
    assert (a - b).abs().max() < 0.05
    assert (a - b).abs().max() > 0  # really the quantized weights


def test_vae_and_text_encoder_single_files_equal_the_folder(tree, parts):
    _, paths = tree
    vae = loading.vae_source(None, paths["flux2_vae"], F32).get()
    reference = _state(parts["vae"].module)
    ours = _state(vae.module)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    encoder = text_encoder_source(parts["folder"], paths["flux2_qwen3"], F32, wrapper=text.Flux2TextEncoder).get()
    torch.testing.assert_close(encoder.encode(PROMPT, TorchRuntime("cpu")), _embeds(parts)[0], atol=1e-6, rtol=0)


def test_foreign_files_are_refused_with_what_they_are(tree, tmp_path):
    from safetensors.torch import save_file

    flux1 = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 2)}, str(flux1))
    with pytest.raises(ModelFileError, match="FLUX.1 transformer, not FLUX.2"):
        loading.transformer_source(None, flux1, F32).get()
    ae = tmp_path / "ae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.weight": torch.zeros(1),
               "encoder.conv_out.weight": torch.zeros(32, 1)}, str(ae))
    with pytest.raises(ModelFileError, match="FLUX.1 VAE"):
        loading.vae_source(None, ae, F32).get()


def test_a_prompt_of_another_encoder_is_refused():
    with pytest.raises(EditKitError, match="width 4096 \\(FLUX.1's T5-XXL\\)"):
        text.read_conditioning([[torch.zeros(1, 5, 4096), {}]], 7680)


def test_sizes_must_be_multiples_of_16():
    with pytest.raises(EditKitError, match="nearest valid size is 64x48"):
        sampler.check_size(70, 50)


# --------------------------------------------------------------------------------------------------
# LoRA


def _write_lora(path, transformer, rank=4):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_qkv_mlp_proj"):
        layer = transformer.get_submodule(name)
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.1
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.1
    save_file(tensors, str(path))


def test_lora_strength_zero_is_the_base_model_and_one_changes_it(parts, tmp_path):
    runtime = TorchRuntime("cpu")
    path = tmp_path / "klein_style.safetensors"
    _write_lora(path, parts["model"].transformer.get().module)
    embeds = _embeds(parts)
    base = sampler.generate(parts["model"], parts["vae"], embeds, runtime, width=32, height=32, seed=4, steps=2)
    off = add_lora(parts["model"], FLUX2_LORA, path, 0.0)
    on = add_lora(parts["model"], FLUX2_LORA, path, 1.0)
    assert torch.equal(sampler.generate(off, parts["vae"], embeds, runtime, width=32, height=32, seed=4, steps=2), base)
    lora = sampler.generate(on, parts["vae"], embeds, runtime, width=32, height=32, seed=4, steps=2)
    assert (lora - base).abs().max() > 1e-4
    again = sampler.generate(parts["model"], parts["vae"], embeds, runtime, width=32, height=32, seed=4, steps=2)
    assert torch.equal(again, base)  # the shared base model is untouched


# --------------------------------------------------------------------------------------------------
# Nodes, called the way ComfyUI calls them, on ComfyUI-style single files


@pytest.fixture()
def loaded(models_root, torch_runtime):
    from editkit.nodes import flux2_nodes as nodes
    from node_calls import call_node

    return call_node(nodes.EditKitFlux2Loader, diffusers_folder=fm.FOLDER, transformer_file=fm.TRANSFORMER_FILE,
                     text_encoder_file=fm.TEXT_ENCODER_FILE, vae_file=fm.VAE_FILE, weight_dtype="fp32")


def test_edit_node_on_single_files_equals_diffusers(loaded, parts):
    """image_1 plus a 'references' batch of two: three references, the output at image_1's size."""
    from editkit.nodes import flux2_nodes as nodes
    from node_calls import call_node

    model, text_encoder, vae = loaded
    positive, _ = call_node(nodes.EditKitFlux2TextEncode, text_encoder=text_encoder, prompt=PROMPT)
    pictures = [_picture(20, 80, 64), _picture(21, 64, 64), _picture(22, 64, 64)]
    as_image = [_tensor(p).permute(0, 2, 3, 1) for p in pictures]
    image, latent = call_node(nodes.EditKitFlux2Sampler, model=model, vae=vae, positive=positive, seed=3, steps=2,
                              image_1=as_image[0], references=torch.cat(as_image[1:]))
    assert image.shape == (1, 64, 80, 3) and latent["samples"].shape == (1, 32, 8, 10)
    with torch.inference_mode():
        theirs = _pipe(parts)(prompt=PROMPT, image=pictures, num_inference_steps=2, text_encoder_out_layers=LAYERS,
                              generator=torch.Generator().manual_seed(3), output_type="latent").images
    torch.testing.assert_close(latent["samples"], theirs.float(), atol=1e-5, rtol=1e-5)


def test_inpaint_node_keeps_the_outside_and_refuses_cfg_without_negative(loaded):
    from editkit.nodes import flux2_nodes as nodes
    from node_calls import call_node

    model, text_encoder, vae = loaded
    positive, _ = call_node(nodes.EditKitFlux2TextEncode, text_encoder=text_encoder, prompt=PROMPT)
    image = _tensor(_picture(30, 48, 32)).permute(0, 2, 3, 1)
    mask = torch.zeros(1, 32, 48)
    mask[:, 4:20, 8:40] = 1.0
    out, latent = call_node(nodes.EditKitFlux2Inpaint, model=model, vae=vae, positive=positive, image=image,
                            mask=mask, steps=2, batch_size=2)
    assert out.shape == (2, 32, 48, 3) and latent["samples"].shape == (2, 32, 4, 6)
    keep = (mask[0] == 0)
    assert all(torch.equal(out[i][keep], image[0][keep]) for i in range(2))
    assert not torch.equal(out[0], out[1])  # each result has its own noise
    with pytest.raises(EditKitError, match="no negative CONDITIONING"):
        call_node(nodes.EditKitFlux2Inpaint, model=model, vae=vae, positive=positive, image=image, mask=mask, cfg=3.0)


def test_bfl_keyed_lora_equals_the_same_lora_in_diffusers_keys(parts, tmp_path):
    """An ai-toolkit/BFL file (fused img qkv) and its diffusers split (q, k, v share A, B cut by rows) give one result."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    width = parts["model"].transformer.get().module.config.num_attention_heads * 128
    down, up = torch.randn(4, width, generator=g) * 0.1, torch.randn(3 * width, 4, generator=g) * 0.1
    bfl = tmp_path / "bfl.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": down,
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": up}, str(bfl))
    split = tmp_path / "split.safetensors"
    save_file({f"transformer.transformer_blocks.0.attn.to_{p}.lora_{r}.weight": t.contiguous()
               for p, rows in zip("qkv", up.chunk(3), strict=True) for r, t in (("A", down.clone()), ("B", rows))},
              str(split))
    runtime = TorchRuntime("cpu")
    embeds = _embeds(parts)
    a = sampler.generate(add_lora(parts["model"], FLUX2_LORA, bfl, 1.0), parts["vae"], embeds, runtime, width=32,
                         height=32, seed=4, steps=2)
    b = sampler.generate(add_lora(parts["model"], FLUX2_LORA, split, 1.0), parts["vae"], embeds, runtime, width=32,
                         height=32, seed=4, steps=2)
    base = sampler.generate(parts["model"], parts["vae"], embeds, runtime, width=32, height=32, seed=4, steps=2)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (a - base).abs().max() > 1e-4


def test_denoise_convention_takes_the_mu_of_the_schedule_it_cuts_from():
    """klein's mu depends on the step count: 'denoise' 0.5 over 4 steps runs the last 4 of an 8-step schedule
    shifted with mu(tokens, 8); 'strength' runs the tail of the 4-step schedule shifted with mu(tokens, 4)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    config = FAMILY.scheduler_config(None)
    for convention, total, keep in (("denoise", 8, 4), ("strength", 4, 2)):
        schedule = sampler.flux2_schedule(config, 4, 300, denoise=0.5, convention=convention)
        reference = FlowMatchEulerDiscreteScheduler.from_config(config)
        reference.set_timesteps(sigmas=np.linspace(1.0, 1 / total, total), mu=compute_empirical_mu(300, total))
        assert torch.equal(schedule.sigmas, reference.sigmas[-(keep + 1):].float())


@pytest.mark.parametrize("size,config", [
    ("4B", dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680)),
    ("9B", dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)),
])
def test_real_sizes_are_read_from_bfl_keys(size, config):
    """The published klein shapes (built on the meta device, written in BFL keys) give back their config."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**{**fm.TINY_TRANSFORMER, **config})
    bfl = {fm.COMFY_PREFIX + k: v for k, v in fm.diffusers_to_bfl(model.state_dict()).items()}
    stripped, layout = loading.SINGLE_FILE._recognise(bfl, Path("flux-2-klein.safetensors"))
    assert layout == "bfl"
    sd = loading._to_diffusers(stripped)
    inferred = loading.transformer_config_from_state_dict(sd)
    assert {k: inferred[k] for k in config} == config, size
    assert inferred["mlp_ratio"] == 3.0 and inferred["in_channels"] == 128 and not inferred["guidance_embeds"]
