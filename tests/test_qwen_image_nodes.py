"""The Qwen-Image nodes as ComfyUI calls them: loader → edit (→ LoRA), LATENT in raw VAE space, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from editkit.nodes import comfy_bridge
from editkit.nodes.qwen_image_nodes import EditKitQwenImageEdit, EditKitQwenImageLoader, EditKitQwenImageLora
from editkit.pipelines.core.errors import EditKitError
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.qwen_image.family import FAMILY
from editkit.pipelines.qwen_image.loading import lightning_scheduler_config
from node_calls import call_node
from tiny.qwen_image import FAMILY as QWEN
from tiny.qwen_image import TINY_TRANSFORMER

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    paths = QWEN.tree(tmp_path_factory.mktemp("qwen_models"))["paths"]
    root = paths["folder"].parents[1]
    loras = root / "loras"
    loras.mkdir(exist_ok=True)
    _write_loras(loras)
    return root


@pytest.fixture(autouse=True)
def tree_and_runtime(root):
    comfy_bridge.set_models_root(root)
    comfy_bridge.set_runtime(TorchRuntime("cpu"))
    yield
    comfy_bridge.set_models_root(None)
    comfy_bridge.set_runtime(None)


def _write_loras(folder):
    """Rank-2 LoRAs for the tiny transformer in the two published layouts, plus a FLUX.1 one."""
    g = torch.Generator().manual_seed(0)
    width, layers = TINY_TRANSFORMER["attention_head_dim"], TINY_TRANSFORMER["num_layers"]
    targets = [f"transformer_blocks.{i}.attn.{name}" for i in range(layers) for name in ("to_q", "to_v", "add_k_proj")]
    targets += [f"transformer_blocks.{i}.img_mlp.net.2" for i in range(layers)]
    peft = {}
    comfy = {}
    for target in targets:
        fan_in = 4 * width if target.endswith("net.2") else width
        down, up = torch.randn(2, fan_in, generator=g) * 0.3, torch.randn(width, 2, generator=g) * 0.3
        peft[f"transformer.{target}.lora_A.weight"] = down
        peft[f"transformer.{target}.lora_B.weight"] = up
        comfy[f"diffusion_model.{target}.lora_down.weight"] = down.clone()
        comfy[f"diffusion_model.{target}.lora_up.weight"] = up.clone()
        comfy[f"diffusion_model.{target}.alpha"] = torch.tensor(2.0)
    save_file(peft, str(folder / "qwen_style_peft.safetensors"))
    save_file(comfy, str(folder / "qwen_style_comfy.safetensors"))
    save_file(comfy, str(folder / "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors"))
    save_file(comfy, str(folder / "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"))
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 2)},
              str(folder / "flux_style.safetensors"))


def _image(width=64, height=48, seed=0, batch=1) -> torch.Tensor:
    array = np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    return torch.from_numpy(array.astype(np.float32) / 255.0)


def _load(**kwargs):
    """The loader's first three outputs (model, text encoder, VAE)."""
    return _load_all(**kwargs)[:3]


def _load_all(**kwargs):
    kwargs.setdefault("diffusers_folder", "Qwen-Image-Edit-2509")
    return call_node(EditKitQwenImageLoader, weight_dtype="fp32", **kwargs)


SMALL = dict(steps=2, custom_vl_size=56, custom_vae_size=64, reference_size="custom", true_cfg_scale=1.0)


def _edit(model, text, vae, **kwargs):
    settings = {**SMALL, "prompt": "change the blue tracksuit to red", **kwargs}
    settings.setdefault("image", _image())
    return call_node(EditKitQwenImageEdit, model=model, text_encoder=text, vae=vae, **settings)


def test_loader_and_edit_give_picture_and_raw_latent():
    model, text, vae = _load()
    assert model.variant == "Qwen-Image-Edit-2509"
    image, latent = _edit(model, text, vae, batch_size=2, seed=5)
    assert image.shape == (2, 48, 64, 3) and image.dtype == torch.float32
    raw = latent["samples"]
    assert raw.shape == (2, 16, 1, 6, 8)  # ComfyUI's Wan-2.1 shape: one frame
    with torch.inference_mode():  # raw VAE space: the VAE decodes it as it is, as ComfyUI's VAEDecode does
        decoded = vae.get().module.decode(raw, return_dict=False)[0][:, :, 0]
    assert (((decoded + 1) / 2).clamp(0, 1).movedim(1, -1) - image).abs().max() < 1e-4


def test_edit_reads_4d_and_5d_latents():
    """The LATENT input takes ComfyUI's 5-D latents and 4-D ones alike (the same edit); its size is the output's,
    its content the start. Video latents, other channel counts and odd sizes are refused with what to do."""
    model, text, vae = _load()
    common = dict(image=_image(32, 48), denoise=0.5)
    raw = torch.randn(2, 16, 1, 4, 6, generator=torch.Generator().manual_seed(3))
    five, five_latent = _edit(model, text, vae, **common, latent={"samples": raw})
    four, four_latent = _edit(model, text, vae, **common, latent={"samples": raw[:, :, 0]})
    assert five.shape == (2, 32, 48, 3)  # the latent's size (48x32), not image 1's (32x48)
    assert five_latent["samples"].shape == (2, 16, 1, 4, 6)
    assert torch.equal(five, four) and torch.equal(five_latent["samples"], four_latent["samples"])
    other, _ = _edit(model, text, vae, **common, latent={"samples": raw.flip(0)})
    assert not torch.equal(other, five)  # the latent is the start
    with pytest.raises(EditKitError, match="holds 3 frames"):
        _edit(model, text, vae, **common, latent={"samples": torch.zeros(1, 16, 3, 4, 4)})
    with pytest.raises(EditKitError, match="16-channel Qwen-Image VAE latent"):
        _edit(model, text, vae, **common, latent={"samples": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(EditKitError, match="multiples of 16 pixels"):
        _edit(model, text, vae, **common, latent={"samples": torch.zeros(1, 16, 1, 3, 4)})


def test_single_files_in_the_loader():
    model, text, vae = _load(
        transformer_file="Qwen-Image-Edit-2509-Q8_0.gguf", text_encoder_file="qwen_2.5_vl_7b_fp8_scaled.safetensors",
        vae_file="qwen_image_vae.safetensors")
    assert model.transformer.get().quantized
    image, _ = _edit(model, text, vae)
    assert image.shape == (1, 48, 64, 3)


def test_references_batch_and_image_inputs_add_pictures():
    model, text, vae = _load()
    image, _ = _edit(model, text, vae, image2=_image(32, 32, 1), references=_image(48, 48, 2, batch=3))
    assert image.shape == (1, 48, 64, 3)


def test_bad_inputs_fail_before_loading_with_clear_errors():
    model, text, vae = _load()
    with pytest.raises(EditKitError, match="'image' holds 2 pictures, but it takes one"):
        _edit(model, text, vae, image=_image(batch=2))
    with pytest.raises(EditKitError, match="more than max_megapixels"):
        _edit(model, text, vae, output_size="explicit", width=2048, height=2048, max_megapixels=1.0)
    with pytest.raises(EditKitError, match="prompt is empty"):
        _edit(model, text, vae, prompt="")
    with pytest.raises(EditKitError, match="Unknown sampler"):
        _edit(model, text, vae, sampler="heun")


def test_lora_strength_zero_equals_the_base_and_the_base_stays_unchanged():
    model, text, vae = _load()
    base, _ = _edit(model, text, vae, seed=3)
    (zero,) = call_node(EditKitQwenImageLora, model=model, lora_name="qwen_style_peft.safetensors", strength=0.0)
    same, _ = _edit(zero, text, vae, seed=3)
    assert torch.equal(same, base)
    (one,) = call_node(EditKitQwenImageLora, model=model, lora_name="qwen_style_peft.safetensors", strength=1.0)
    changed, _ = _edit(one, text, vae, seed=3)
    assert (changed - base).abs().max() > 1e-3
    again, _ = _edit(model, text, vae, seed=3)
    assert torch.equal(again, base)  # the LoRA left nothing behind


def test_lora_on_a_gguf_transformer_keeps_it_quantized():
    model, text, vae = _load(transformer_file="Qwen-Image-Edit-2509-Q8_0.gguf")
    base, _ = _edit(model, text, vae, seed=6)
    (zero,) = call_node(EditKitQwenImageLora, model=model, lora_name="qwen_style_comfy.safetensors", strength=0.0)
    (one,) = call_node(EditKitQwenImageLora, model=model, lora_name="qwen_style_comfy.safetensors", strength=1.0)
    assert torch.equal(_edit(zero, text, vae, seed=6)[0], base)
    assert (_edit(one, text, vae, seed=6)[0] - base).abs().max() > 1e-3
    assert one.transformer.get().quantized


def test_comfyui_layout_lora_equals_peft_layout():
    model, text, vae = _load()
    (peft,) = call_node(EditKitQwenImageLora, model=model, lora_name="qwen_style_peft.safetensors", strength=0.7)
    (comfy,) = call_node(EditKitQwenImageLora, model=model, lora_name="qwen_style_comfy.safetensors", strength=0.7)
    peft_out, _ = _edit(peft, text, vae, seed=4)
    comfy_out, _ = _edit(comfy, text, vae, seed=4)
    assert (peft_out - comfy_out).abs().max() < 1e-5  # alpha 2 / rank 2 = 1: the same LoRA in both layouts


def test_lightning_lora_samples_with_its_schedule_at_4_steps_without_cfg():
    from editkit.pipelines.core.sampling import flow_schedule

    model, text, vae = _load()
    (fast,) = call_node(EditKitQwenImageLora, model=model,
                        lora_name="Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors", strength=1.0)
    assert model.schedule == FAMILY.scheduler_config(model.folder)
    assert fast.schedule == lightning_scheduler_config()
    lightning = flow_schedule(fast.schedule, 4, image_seq_len=4096).sigmas
    own = flow_schedule(model.schedule, 4, image_seq_len=4096).sigmas
    assert len(lightning) == 5 and float(lightning[-1]) == 0.0 and not torch.allclose(lightning, own)
    image, _ = _edit(fast, text, vae, steps=4, true_cfg_scale=1.0)
    assert image.shape == (1, 48, 64, 3) and torch.isfinite(image).all()


def test_loader_says_which_variant_it_loaded(caplog):
    with caplog.at_level("INFO", logger="EditKit"):
        *_, said = _load_all()
    assert said == "Qwen-Image-Edit-2509, from Qwen-Image-Edit-2509/model_index.json"
    assert "EditKit · Qwen-Image Loader: Qwen-Image-Edit-2509" in caplog.text
    model, _, _, said = _load_all(diffusers_folder="(none)", transformer_file="qwen_image_edit_2511_bf16.safetensors")
    assert said == "Qwen-Image-Edit-2511, from the file's __index_timestep_zero__ tensor"
    assert "Qwen-Image-Edit-2511" in repr(model)
    *_, said = _load_all(transformer_file="qwen-image-edit-2511-Q8_0.gguf")
    assert said == "Qwen-Image-Edit-2511, from the file name 'qwen-image-edit-2511-Q8_0.gguf'"
    *_, said = _load_all(transformer_file="qwen_image_edit_2511_bf16.safetensors", variant="Qwen-Image-Edit-2509")
    assert said == "Qwen-Image-Edit-2509 (set in the loader)"


def test_2511_lightning_lora_takes_the_2509_path_on_the_2511_model():
    """lightx2v's Qwen-Image-Edit-2511-Lightning LoRA: same keys, same hooks, same 4-step schedule as 2509's."""
    model, text, vae = _load(transformer_file="qwen_image_edit_2511_bf16.safetensors")
    assert model.variant == "Qwen-Image-Edit-2511" and model.transformer.get().module.config.zero_cond_t
    base, _ = _edit(model, text, vae, steps=4, seed=8, image2=_image(32, 32, 1))
    (fast,) = call_node(EditKitQwenImageLora, model=model,
                        lora_name="Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors", strength=1.0)
    (same_2509,) = call_node(EditKitQwenImageLora, model=model,
                             lora_name="Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors", strength=1.0)
    assert fast.schedule == lightning_scheduler_config() and fast.variant == "Qwen-Image-Edit-2511"
    lit, _ = _edit(fast, text, vae, steps=4, seed=8, image2=_image(32, 32, 1))
    assert (lit - base).abs().max() > 1e-3  # the LoRA acts on the 2511 model
    assert torch.equal(lit, _edit(same_2509, text, vae, steps=4, seed=8, image2=_image(32, 32, 1))[0])
    assert torch.equal(base, _edit(model, text, vae, steps=4, seed=8, image2=_image(32, 32, 1))[0])  # base untouched


def test_lora_of_another_family_is_refused():
    model, _, _ = _load()
    with pytest.raises(EditKitError, match="FLUX.1"):
        call_node(EditKitQwenImageLora, model=model, lora_name="flux_style.safetensors", strength=1.0)


@pytest.mark.comfyui
def test_single_files_with_comfyuis_bundled_tokenizer_in_comfyui(comfyui, small_inputs):
    """Inside ComfyUI, no folder: ComfyUI's single files, the tokenizer from ComfyUI's own qwen25_tokenizer."""
    import json

    from packload import ROOT

    prompt = json.loads((ROOT / "workflows" / "api" / "qwen_edit_appearance.json").read_text())
    prompt["1"]["inputs"].update(diffusers_folder="(none)", transformer_file="qwen_image_edit_2509_fp8_e4m3fn.safetensors",
                                 text_encoder_file="qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                 vae_file="qwen_image_vae.safetensors")
    prompt["3"]["inputs"].update(steps=2, custom_vl_size=56, custom_vae_size=64)
    comfyui.use_inputs(small_inputs)
    try:
        run = comfyui.run(prompt)
    finally:
        comfyui.use_inputs(ROOT / "workflows" / "inputs")
    assert run.success, run.error()
    image = run.output("3", 0)
    assert tuple(image.shape) == (1, 128, 112, 3)
