"""Every EditKit model can be partially loaded by ComfyUI's memory manager and streams the rest (issue 17, fault 2).

For each family (FLUX.1 / Fill / Kontext-inpaint transformers, the FLUX.1 VAE, the Redux prior and SigLIP,
Qwen-Image-Edit and Qwen-Image-Layered transformers and VAEs, Z-Image, FLUX.2 [klein] 4B and 9B and its VAE,
BEN2, and the text encoders CLIP-L, T5-XXL, Qwen2.5-VL, Qwen3-4B and Qwen3-8B), wrapped in EditKit's patcher as ``ComfyRuntime`` wraps it:

* **real size** (built on the meta device from the shipped configs, no memory): ComfyUI's ``LoadedModel``
  loads it with a budget of 30 % of its size. What lands on the device is within the budget, and every
  module holding tensors that was left behind streams (ComfyUI's cast flag, or core.casting's hook);
* **real width, one block** (uninitialised CPU memory that is never read, so it costs no RAM): loaded with
  a 30 % budget onto a "GPU" played by the meta device, it runs with its inputs there. A tensor left on the
  CPU by a layer that does not stream raises a device mismatch, so this catches any layer type the bridge
  misses;
* **same output** (small width, every layer type of the real model, random weights on the CPU): partially
  loaded (30 %) onto an alias of the CPU that ComfyUI treats as another device, so its cast paths run, the
  model gives the output of the fully loaded one. The device movement itself is what the meta run checks;
  tests/test_partial_equals_full.py repeats this at real width (``-m slow`` for most families).

Transformers and text encoders loaded from fp8 files keep fp8 Linear weights: at real size their budget
counts fp8 bytes, fp8 layers load as fp8, and at real width the fp8 layers left behind stream.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from editkit.pipelines.flux.flow import text_ids, token_ids
from packload import ROOT

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_ROOT"), reason="set COMFYUI_ROOT to a ComfyUI checkout"),
]

FLUX = ROOT / "pipelines" / "flux" / "configs"
QWEN = ROOT / "pipelines" / "qwen_image" / "configs"
ZIMAGE = ROOT / "pipelines" / "zimage" / "configs"
FLUX2 = ROOT / "pipelines" / "flux2" / "configs"
REDUX = ROOT / "pipelines" / "flux" / "redux" / "configs"
BUDGET = 0.3


def _config(folder: Path, **overrides) -> dict:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if not k.startswith("_")} | overrides


# --------------------------------------------------------------------------------------------------------------
# The families: how to build each at the three sizes, and how to run it


def _flux(size, **extra):
    from diffusers import FluxTransformer2DModel

    if size == "tiny":
        from tiny.flux1 import TINY_TRANSFORMER

        return FluxTransformer2DModel(**dict(TINY_TRANSFORMER, **extra))
    shallow = dict(num_layers=1, num_single_layers=1) if size == "shallow" else {}
    return FluxTransformer2DModel(**_config(FLUX / "flux_fill_transformer", **shallow, **extra))


def _run_flux(model, device):
    c = model.config
    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 16, c.in_channels, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([30.0]), pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                encoder_hidden_states=torch.randn(1, 7, c.joint_attention_dim, generator=g))
    return model(**{k: v.to(device) for k, v in args.items()}, txt_ids=text_ids(7, device),
                 img_ids=token_ids(8, 8, 0, device), return_dict=False)[0]


def _flux_vae(size):
    from diffusers import AutoencoderKL

    if size == "tiny":
        from tiny.flux1 import TINY_VAE

        return AutoencoderKL(**TINY_VAE)
    return AutoencoderKL(**_config(FLUX / "flux_vae"))


def _run_flux_vae(model, device):
    g = torch.Generator().manual_seed(0)
    z = model.encode(torch.rand(1, 3, 32, 32, generator=g).to(device) * 2 - 1).latent_dist.mode()
    return model.decode(z).sample


def _qwen(size, **extra):
    from diffusers import QwenImageTransformer2DModel

    if size == "tiny":
        from tiny.qwen_image import TINY_TRANSFORMER

        return QwenImageTransformer2DModel(**dict(TINY_TRANSFORMER, **extra))
    shallow = dict(num_layers=1) if size == "shallow" else {}
    return QwenImageTransformer2DModel(**_config(QWEN / "transformer", **shallow, **extra))


def _run_qwen(model, device):
    c = model.config
    g = torch.Generator().manual_seed(0)
    layered = bool(getattr(c, "use_additional_t_cond", False))
    frames = 2 if layered else 1  # Layered: layers + the picture; Edit: the output + one reference
    hidden = torch.randn(1, 16 * (frames + 1), c.in_channels, generator=g)
    extra = {"additional_t_cond": torch.zeros(1, dtype=torch.long, device=device)} if layered else {}
    return model(hidden_states=hidden.to(device), timestep=torch.tensor([0.5], device=device),
                 encoder_hidden_states=torch.randn(1, 7, c.joint_attention_dim, generator=g).to(device),
                 encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long, device=device),
                 img_shapes=[[(1, 4, 4)] * (frames + 1)], return_dict=False, **extra)[0]


def _qwen_vae(size, **extra):
    from diffusers import AutoencoderKLQwenImage

    if size == "tiny":
        from tiny.qwen_image import TINY_VAE

        return AutoencoderKLQwenImage(**dict(TINY_VAE, **extra))
    return AutoencoderKLQwenImage(**_config(QWEN / "vae", **extra))


def _run_qwen_vae(model, device):
    g = torch.Generator().manual_seed(0)
    channels = model.config.input_channels
    z = model.encode(torch.rand(1, channels, 1, 32, 32, generator=g).to(device) * 2 - 1).latent_dist.mode()
    return model.decode(z, return_dict=False)[0]


def _zimage(size):
    from diffusers import ZImageTransformer2DModel

    if size == "tiny":
        from tiny.zimage import TINY_TRANSFORMER

        return ZImageTransformer2DModel(**TINY_TRANSFORMER)
    shallow = dict(n_layers=1, n_refiner_layers=1) if size == "shallow" else {}
    return ZImageTransformer2DModel(**_config(ZIMAGE / "zimage_transformer", **shallow))


def _run_zimage(model, device):
    c = model.config
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(c.in_channels, 1, 8, 8, generator=g).to(device)]
    captions = [torch.randn(7, c.cap_feat_dim, generator=g).to(device)]
    out = model(latents, torch.tensor([0.5], device=device), captions, return_dict=False)[0]
    return torch.stack(out)


# FLUX.2 [klein]: the shipped config is klein 4B; 9B differs in width, depth and text width (the published
# shapes, as tests/test_flux2.py reads them back from BFL keys)
KLEIN_9B = dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)


def _flux2(size, **real):
    """``real``: overrides of the shipped 4B config (9B), for the real-width and real-size models only."""
    from diffusers import Flux2Transformer2DModel

    if size == "tiny":  # 4B and 9B differ only in sizes: one tiny model covers both layer sets
        from tiny.flux2 import TINY_TRANSFORMER

        return Flux2Transformer2DModel(**TINY_TRANSFORMER)
    shallow = dict(num_layers=1, num_single_layers=1) if size == "shallow" else {}
    return Flux2Transformer2DModel(**_config(FLUX2 / "klein_transformer", **dict(real, **shallow)))


def _run_flux2(model, device):
    """As EditKit's klein sampler calls it: 4 x 4 output tokens plus 2 x 2 tokens of one reference picture."""
    from editkit.pipelines.flux2 import latent as fl

    c = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([fl.positions(0, 4, 4), fl.positions(10, 2, 2)])
    return model(hidden_states=torch.randn(1, 20, c.in_channels, generator=g).to(device),
                 encoder_hidden_states=torch.randn(1, 7, c.joint_attention_dim, generator=g).to(device),
                 timestep=torch.tensor([0.5], device=device), img_ids=ids.unsqueeze(0).to(device),
                 txt_ids=fl.text_positions(7).unsqueeze(0).to(device), guidance=None, return_dict=False)[0]


def _flux2_vae(size):
    from diffusers import AutoencoderKLFlux2

    if size == "tiny":
        from tiny.flux2 import TINY_VAE

        return AutoencoderKLFlux2(**TINY_VAE)
    return AutoencoderKLFlux2(**_config(FLUX2 / "flux2_vae"))


def _ben2(size):
    from editkit.pipelines.ben2 import BEN2Base, BEN2Config

    return BEN2Base(BEN2Config.tiny() if size == "tiny" else BEN2Config())


def _run_ben2(model, device):
    from editkit.pipelines.ben2.config import SIZE_MULTIPLE

    g = torch.Generator().manual_seed(0)
    return model(torch.rand(1, 3, SIZE_MULTIPLE, SIZE_MULTIPLE, generator=g).to(device))


def _redux(size):
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    if size == "tiny":
        return ReduxImageEncoder(redux_dim=8, txt_in_features=32)
    return ReduxImageEncoder(**_config(REDUX / "flux_redux_embedder"))


def _run_redux(model, device):
    g = torch.Generator().manual_seed(0)
    return model(torch.randn(1, 9, model.redux_up.in_features, generator=g).to(device)).image_embeds


def _siglip(size):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig.from_pretrained(str(REDUX / "siglip_so400m_patch14_384"))
    if size == "shallow":
        config.num_hidden_layers = 1
    if size == "tiny":
        config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=28, patch_size=14)
    return SiglipVisionModel(config)


def _run_siglip(model, device):
    g = torch.Generator().manual_seed(0)
    side = model.config.image_size
    return model(pixel_values=torch.randn(1, 3, side, side, generator=g).to(device)).last_hidden_state


def _text(cls_name, folder, layers_key, tiny, real=None):
    """``real``: overrides of the shipped config (another published size of the same architecture)."""

    def build(size):
        import transformers

        cls = getattr(transformers, cls_name)
        config_cls = cls.config_class
        if size == "tiny":
            return cls(config_cls(**tiny))
        config = config_cls.from_pretrained(str(folder), **(real or {}))
        if size == "shallow":
            target = config.text_config if hasattr(config, "text_config") else config
            setattr(target, layers_key, 1)
            if hasattr(config, "vision_config"):
                config.vision_config.depth = 1
            config._attn_implementation = "eager"  # sdpa's mask shortcut reads values, which meta tensors lack
        return cls(config)

    return build


def _run_text(model, device):
    ids = torch.arange(3, 11).unsqueeze(0).to(device)
    # causal models build their mask from position ids without one (a value read meta tensors do not have)
    mask = None if model.config.model_type == "t5" else torch.ones_like(ids)
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


TINY_QWEN = dict(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1,
                                  rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
                 vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=1, out_hidden_size=32))


@dataclass
class Family:
    build: object  # size ("full", "shallow", "tiny") -> module
    run: object  # (module, device) -> tensor
    kind: str


FAMILIES = {
    "flux_fill": Family(_flux, _run_flux, "diffusion"),
    "flux_dev": Family(lambda s: _flux(s, in_channels=64), _run_flux, "diffusion"),
    "kontext_inpaint": Family(lambda s: _flux(s, in_channels=192), _run_flux, "diffusion"),  # widened Fill
    "flux_vae": Family(_flux_vae, _run_flux_vae, "vae"),
    "redux_prior": Family(_redux, _run_redux, "text_encoder"),
    "siglip": Family(_siglip, _run_siglip, "text_encoder"),
    "qwen_edit": Family(_qwen, _run_qwen, "diffusion"),
    "qwen_layered": Family(lambda s: _qwen(s, use_additional_t_cond=True, use_layer3d_rope=True), _run_qwen,
                           "diffusion"),
    "qwen_vae": Family(_qwen_vae, _run_qwen_vae, "vae"),
    "qwen_layered_vae": Family(lambda s: _qwen_vae(s, input_channels=4), _run_qwen_vae, "vae"),
    "zimage": Family(_zimage, _run_zimage, "diffusion"),
    "ben2": Family(_ben2, _run_ben2, "segmentation"),
    "flux2_klein_4b": Family(_flux2, _run_flux2, "diffusion"),
    "flux2_klein_9b": Family(lambda s: _flux2(s, **KLEIN_9B), _run_flux2, "diffusion"),
    "flux2_vae": Family(_flux2_vae, _run_flux_vae, "vae"),
    "clip_l": Family(_text("CLIPTextModel", FLUX / "clip_l", "num_hidden_layers",
                           dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, projection_dim=32)), _run_text, "text_encoder"),
    "t5_xxl": Family(_text("T5EncoderModel", FLUX / "t5_xxl", "num_layers",
                           dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu")), _run_text, "text_encoder"),
    "qwen25_vl": Family(_text("Qwen2_5_VLModel", QWEN / "text_encoder", "num_hidden_layers", TINY_QWEN), _run_text,
                        "text_encoder"),
    "qwen3": Family(_text("Qwen3Model", ZIMAGE / "qwen3_4b", "num_hidden_layers",
                          dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16)), _run_text, "text_encoder"),
    # FLUX.2 [klein] 9B's encoder (klein 4B's is "qwen3", Z-Image's): the published Qwen3-8B shapes
    "qwen3_8b": Family(_text("Qwen3Model", ZIMAGE / "qwen3_4b", "num_hidden_layers",
                             dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16),
                             dict(hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)),
                       _run_text, "text_encoder"),
}


# --------------------------------------------------------------------------------------------------------------
# Helpers: EditKit's patcher on a chosen "GPU"


@pytest.fixture()
def bridge(comfyui):
    return comfyui.pack_submodule("nodes.comfy_bridge")


def _on_device(monkeypatch, device):
    import comfy.model_management as mm

    for name in ("get_torch_device", "text_encoder_device", "vae_device"):
        monkeypatch.setattr(mm, name, lambda device=device: device)


def _patcher(comfyui, bridge, module, kind):
    component = comfyui.pack_submodule("pipelines.core.runtime").Component(module.eval(), kind, kind, torch.float32)
    runtime = bridge.ComfyRuntime()
    patcher, castable = runtime._entry(component)
    assert castable, "EditKit would force a full load of this model"
    return component, patcher


def _partial_load(patcher, budget):
    import comfy.model_management as mm

    loaded = mm.LoadedModel(patcher)
    loaded.model_load(lowvram_model_memory=budget)  # what load_models_gpu does when VRAM is short
    return loaded


def _tensor_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module._parameters.values()) +
               list(module._buffers.values()) if t is not None)


def _check_streamable(module):
    """Every module holding tensors that was not loaded casts them to the input's device per call."""
    from editkit.pipelines.core.casting import MARK

    stuck = [name for name, m in module.named_modules() if _tensor_bytes(m) and not getattr(m, "comfy_patched_weights",
             False) and not (getattr(m, "comfy_cast_weights", False) or getattr(m, MARK, False)
                             or type(m).__name__.startswith("Comfy"))]
    # ComfyUI's own ops set comfy_cast_weights=True when it streams them; EditKit's hook covers every other type
    assert not stuck, f"left on the offload device without a way to stream: {stuck[:5]}"


# --------------------------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_real_size_partial_load_stays_within_budget(name, comfyui, bridge, monkeypatch):
    family = FAMILIES[name]
    with torch.device("meta"):
        module = family.build("full")
    _on_device(monkeypatch, torch.device("meta"))
    component, patcher = _patcher(comfyui, bridge, module, family.kind)
    size = patcher.model_size()
    assert size == sum(t.numel() * t.element_size() for t in module.state_dict().values())
    budget = int(BUDGET * size)
    _partial_load(patcher, budget)
    on_device = sum(_tensor_bytes(m) for m in module.modules() if getattr(m, "comfy_patched_weights", False))
    assert 0 < on_device <= budget, f"{on_device / 2**30:.2f} GiB loaded for a budget of {budget / 2**30:.2f} GiB"
    assert patcher.loaded_size() <= budget and patcher.model.model_lowvram
    _check_streamable(module)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_real_width_model_streams_to_the_device(name, comfyui, bridge, monkeypatch):
    family = FAMILIES[name]
    with torch.device("meta"):
        module = family.build("shallow")
    module.to_empty(device="cpu")  # never read: the "GPU" below is the meta device
    meta = torch.device("meta")
    _on_device(monkeypatch, meta)
    component, patcher = _patcher(comfyui, bridge, module, family.kind)
    _partial_load(patcher, int(BUDGET * patcher.model_size()))
    devices = {t.device.type for t in module.state_dict().values()}
    assert devices == {"cpu", "meta"}, f"not a partial load: tensors on {devices}"
    with torch.inference_mode():
        out = family.run(module, meta)
    assert out.device == meta
    assert {t.device.type for t in module.state_dict().values()} == devices  # the streamed copies were dropped


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_partial_load_gives_the_full_load_output(name, comfyui, bridge, monkeypatch):
    family = FAMILIES[name]
    torch.manual_seed(0)
    full = family.build("tiny").eval()
    with torch.no_grad():
        for tensor in full.state_dict().values():  # diffusers zero-inits some outputs: give every weight values
            if tensor.is_floating_point() and tensor.abs().max() == 0:
                tensor.normal_(std=0.05)
    with torch.inference_mode():
        expected = family.run(full, torch.device("cpu"))
    alias = torch.device("cpu", 0)  # another device for ComfyUI, the CPU for torch
    _on_device(monkeypatch, alias)
    component, patcher = _patcher(comfyui, bridge, full, family.kind)
    _partial_load(patcher, int(BUDGET * patcher.model_size()))
    assert patcher.model.model_lowvram and 0 < patcher.loaded_size() < patcher.model_size()
    with torch.inference_mode():
        got = family.run(full, alias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# Every loader keeps an fp8 file's Linear weights in fp8 (issue 17, fault 3; e4m3fn, e5m2, ComfyUI's scaled
# fp8): those models stream with fp8 weights, each cast (times its scale) per call by EditKit's CastLinear
SCALED_FP8 = ["flux_fill", "flux2_klein_4b", "flux2_klein_9b", "qwen25_vl", "qwen3", "qwen_edit", "qwen_layered",
              "t5_xxl", "zimage"]


def _scaled_fp8(comfyui, module) -> int:
    """Every Linear of ``module`` (built on the meta device) stored in e4m3fn with a scale, as the loaders
    leave an fp8 file's layers (core.precision's CastLinear; transformers' ``_keep_in_fp32_modules``, T5's
    ``wo``, are widened instead); returns how many."""
    precision = comfyui.pack_submodule("pipelines.core.precision")
    keep32 = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    kept = {f"{name}.weight": (torch.empty(layer.weight.shape, dtype=torch.float8_e4m3fn, device="meta"), 0.5)
            for name, layer in module.named_modules()
            if type(layer) in precision.PLAIN_LINEARS and not keep32.intersection(name.split("."))}
    return precision.restore_fp8(module, kept, torch.float32)


@pytest.mark.parametrize("name", SCALED_FP8)
def test_scaled_fp8_model_streams_at_real_size(name, comfyui, bridge, monkeypatch):
    family = FAMILIES[name]
    meta = torch.device("meta")
    _on_device(monkeypatch, meta)
    with meta:
        module = family.build("full")
    assert _scaled_fp8(comfyui, module) > 0
    component, patcher = _patcher(comfyui, bridge, module, family.kind)
    size = patcher.model_size()
    assert size == sum(t.numel() * t.element_size() for t in module.state_dict().values())  # fp8: 1 byte each
    budget = int(BUDGET * size)
    _partial_load(patcher, budget)
    on_device = [m for m in module.modules() if getattr(m, "comfy_patched_weights", False)]
    assert 0 < sum(_tensor_bytes(m) for m in on_device) <= budget
    fp8 = [m for m in module.modules() if hasattr(m, "weight_scale")]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8), "loading cast fp8 weights up"
    _check_streamable(module)

    # one block at real width runs on the meta "GPU" with nothing loaded (as --novram; with 30 % a text
    # encoder's embedding alone fills the budget and its small fp8 layers all load): every fp8 Linear streams
    with meta:
        shallow = family.build("shallow")
    fp8_layers = _scaled_fp8(comfyui, shallow)
    shallow.to_empty(device="cpu")  # never read
    component, patcher = _patcher(comfyui, bridge, shallow, family.kind)
    _partial_load(patcher, 1)
    left = [m for m in shallow.modules() if getattr(m, "comfy_cast_weights", False) and hasattr(m, "weight_scale")]
    assert len(left) == fp8_layers and all(m.weight.device.type == "cpu" for m in left), "an fp8 layer is stuck"
    with torch.inference_mode():
        assert family.run(shallow, meta).device == meta
