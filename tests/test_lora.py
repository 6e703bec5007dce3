"""LoRA: every file format against weights merged independently, exactness of the base model, errors, nodes.

The reference for every format is the base transformer with ``W + strength * alpha / r * B @ A`` merged
into its weights by this file (in float64), for BFL-keyed files in BFL key space and converted with
EditKit's checkpoint layout code, which shares nothing with the LoRA code under test.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from editkit.pipelines.core import lora as core_lora
from editkit.pipelines.core.errors import EditKitError, ModelFileError
from editkit.pipelines.core.runtime import Component, TorchRuntime
from editkit.pipelines.flux import layout
from editkit.pipelines.flux.loading import FluxModel, transformer_source
from editkit.pipelines.flux.lora import FLUX_LORA
from node_calls import call_node

F32 = torch.float32
RANK = 4

# diffusers module names (tiny FLUX.1-Fill: width 128, 1 double + 1 single block) and the BFL modules
# holding them, for LoRAs written in each key layout.
DIFFUSERS_TARGETS = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_add_out",
    "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2", "transformer_blocks.0.norm1.linear",
    "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.0.proj_out", "proj_out",
]
BFL_TARGETS = [
    "double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0",
    "double_blocks.0.txt_mlp.2", "double_blocks.0.img_mod.lin", "single_blocks.0.linear1", "single_blocks.0.linear2",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
]


@pytest.fixture(scope="module")
def base(tiny_models) -> Component:
    """The shared tiny FLUX.1-Fill transformer (fp32), as every other test and node gets it."""
    return transformer_source(tiny_models / "diffusers" / "FLUX.1-Fill-dev", None, F32).get()


def _inputs(model, seed=3, tokens=16, text=5):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(
        hidden_states=torch.randn(1, tokens, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7]), guidance=torch.tensor([30.0]),
        img_ids=torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], -1).float(),
        txt_ids=torch.zeros(text, 3), return_dict=False,
    )


def _run(model, inputs, dtype=None):
    with torch.inference_mode():
        if dtype not in (None, F32):
            inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k not in ("img_ids", "txt_ids")
                      else v for k, v in inputs.items()}
        return model(**inputs)[0].float()


def _shapes(model, bfl: bool) -> dict[str, tuple[int, int]]:
    """(out, in) of each target, read from the model's (BFL-converted) state dict."""
    sd = model.state_dict()
    if bfl:
        sd = layout.diffusers_transformer_to_bfl(sd)
        return {m: tuple(sd[f"{m}.weight"].shape) for m in BFL_TARGETS}
    return {m: tuple(sd[f"{m}.weight"].shape) for m in DIFFUSERS_TARGETS}


def _pairs(shapes, seed, rank=RANK):
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, i, generator=g) * 0.2, torch.randn(o, rank, generator=g) * 0.2)
            for m, (o, i) in shapes.items()}


def _write(path, tensors, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_lora(path, model, fmt: str, seed=11, alpha=8.0):
    """A LoRA file in ``fmt``; returns (path, {module: (down, up, scale)}, key space 'bfl'|'diffusers')."""
    bfl = fmt in ("kohya", "comfy_ab", "comfy_down_up")
    pairs = _pairs(_shapes(model, bfl), seed)
    tensors, metadata, layers = {}, None, {}
    for module, (down, up) in pairs.items():
        scale = alpha / RANK
        if fmt == "peft":
            tensors[f"transformer.{module}.lora_A.weight"] = down
            tensors[f"transformer.{module}.lora_B.weight"] = up
            tensors[f"transformer.{module}.alpha"] = torch.tensor(alpha)
        elif fmt == "peft_metadata":
            tensors[f"transformer.{module}.lora_A.weight"] = down
            tensors[f"transformer.{module}.lora_B.weight"] = up
            metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": alpha})}
        elif fmt == "kohya":
            name = "lora_unet_" + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        elif fmt == "comfy_down_up":
            tensors[f"diffusion_model.{module}.lora_down.weight"] = down
            tensors[f"diffusion_model.{module}.lora_up.weight"] = up
            tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
        elif fmt == "comfy_ab":  # no alpha: scale 1
            tensors[f"diffusion_model.{module}.lora_A.weight"] = down
            tensors[f"diffusion_model.{module}.lora_B.weight"] = up
            scale = 1.0
        layers[module] = (down, up, scale)
    return _write(path, tensors, metadata), layers, ("bfl" if bfl else "diffusers")


def merged(model, *loras):
    """A copy of ``model`` with each (layers, space, strength) merged into its weights, computed here."""
    out = copy.deepcopy(model)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    for layers, space, strength in loras:
        if space == "bfl":
            bfl = layout.diffusers_transformer_to_bfl(sd)
            for module, (down, up, scale) in layers.items():
                bfl[f"{module}.weight"] = bfl[f"{module}.weight"] + strength * scale * (up.double() @ down.double())
            sd = layout.bfl_transformer_to_diffusers(bfl)
        else:
            for module, (down, up, scale) in layers.items():
                sd[f"{module}.weight"] = sd[f"{module}.weight"] + strength * scale * (up.double() @ down.double())
    out.load_state_dict({k: v.to(F32) for k, v in sd.items()}, strict=True)
    return out


def lora_run(component, *loras, inputs):
    """Forward with LoRAs ((weights, strength), ...) applied as a sampler applies them."""
    with core_lora.applied_loras(component, tuple(loras)) as shared:
        assert shared is component
        return _run(component.module, inputs, component.dtype)


FORMATS = ["peft", "peft_metadata", "kohya", "comfy_down_up", "comfy_ab"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_equals_independently_merged_weights(base, tmp_path, fmt):
    path, layers, space = write_lora(tmp_path / f"{fmt}.safetensors", base.module, fmt)
    weights = core_lora.read_lora(path, FLUX_LORA)
    inputs = _inputs(base.module)
    before = _run(base.module, inputs)
    out = lora_run(base, (weights, 0.8), inputs=inputs)
    reference = _run(merged(base.module, (layers, space, 0.8)), inputs)
    assert (out - before).abs().max() > 1e-2  # the LoRA matters
    assert torch.allclose(out, reference, atol=1e-5, rtol=0), (out - reference).abs().max()
    assert torch.equal(_run(base.module, inputs), before)  # the shared model is untouched afterwards


def test_linear1_is_split_at_the_files_width(base, tmp_path):
    """diffusers' converter assumes width 3072 for single_blocks.N.linear1; EditKit uses the file's (128 here)."""
    path, _layers, _ = write_lora(tmp_path / "k.safetensors", base.module, "kohya")
    weights = core_lora.read_lora(path, FLUX_LORA)
    for part in ("attn.to_q", "attn.to_k", "attn.to_v"):
        assert weights.layers[f"single_transformer_blocks.0.{part}"].up.shape == (128, RANK)
    assert weights.layers["single_transformer_blocks.0.proj_mlp"].up.shape == (512, RANK)


def test_own_conversions_equal_diffusers_where_diffusers_is_right():
    """At FLUX.1's width (3072) and without alpha, EditKit's linear1 split and final_layer swap give diffusers' deltas."""
    from diffusers.loaders import FluxLoraLoaderMixin

    from editkit.pipelines.flux.lora import convert_flux_lora

    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_single_blocks_3_linear1.lora_down.weight": torch.randn(4, 3072, generator=g),
          "lora_unet_single_blocks_3_linear1.lora_up.weight": torch.randn(7 * 3072, 4, generator=g),
          "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.randn(4, 3072, generator=g),
          "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": torch.randn(6144, 4, generator=g)}
    theirs = {k.removeprefix("transformer."): v for k, v in FluxLoraLoaderMixin.lora_state_dict(dict(sd)).items()}
    mine, alphas = convert_flux_lora(dict(sd))
    targets = ["single_transformer_blocks.3.attn.to_q", "single_transformer_blocks.3.attn.to_k",
               "single_transformer_blocks.3.attn.to_v", "single_transformer_blocks.3.proj_mlp", "norm_out.linear"]
    assert sorted(mine) == sorted(theirs) == sorted(f"{t}.lora_{x}.weight" for t in targets for x in "AB")
    assert alphas == {}
    for t in targets:
        assert torch.equal(mine[f"{t}.lora_B.weight"] @ mine[f"{t}.lora_A.weight"],
                           theirs[f"{t}.lora_B.weight"] @ theirs[f"{t}.lora_A.weight"]), t


def test_strength_zero_is_bitwise_the_base_and_hooks_leave_no_trace(base, tmp_path):
    path, _layers, _ = write_lora(tmp_path / "p.safetensors", base.module, "peft")
    weights = core_lora.read_lora(path, FLUX_LORA)
    inputs = _inputs(base.module)
    before = _run(base.module, inputs)
    assert torch.equal(lora_run(base, (weights, 0.0), inputs=inputs), before)
    lora_run(base, (weights, 1.5), inputs=inputs)
    with pytest.raises(RuntimeError, match="boom"), core_lora.applied_loras(base, ((weights, 1.0),)):
        raise RuntimeError("boom")  # hooks are removed on errors and interrupts too
    assert not any(m._forward_hooks for m in base.module.modules())
    assert torch.equal(_run(base.module, inputs), before)


def test_chained_loras_equal_the_sum_of_their_deltas(base, tmp_path):
    p1, layers1, space1 = write_lora(tmp_path / "a.safetensors", base.module, "peft", seed=21)
    p2, layers2, space2 = write_lora(tmp_path / "b.safetensors", base.module, "kohya", seed=22, alpha=2.0)
    w1, w2 = core_lora.read_lora(p1, FLUX_LORA), core_lora.read_lora(p2, FLUX_LORA)
    inputs = _inputs(base.module)
    out = lora_run(base, (w1, 0.6), (w2, -1.3), inputs=inputs)
    reference = _run(merged(base.module, (layers1, space1, 0.6), (layers2, space2, -1.3)), inputs)
    assert torch.allclose(out, reference, atol=1e-5, rtol=0), (out - reference).abs().max()


def test_handles_chain_without_changing_the_incoming_model(base, tiny_models, tmp_path):
    p1, _, _ = write_lora(tmp_path / "a.safetensors", base.module, "peft", seed=21)
    p2, _, _ = write_lora(tmp_path / "b.safetensors", base.module, "comfy_ab", seed=22)
    model = FluxModel(transformer_source(tiny_models / "diffusers" / "FLUX.1-Fill-dev", None, F32), {"x": 1})
    one = core_lora.add_lora(model, FLUX_LORA, p1, 0.5)
    two = core_lora.add_lora(one, FLUX_LORA, p2, 2.0)
    assert model.transformer.get() is base and one.scheduler_config is model.scheduler_config
    component = two.transformer.get()
    assert isinstance(component, core_lora.LoraComponent) and component.base is base
    assert component.module is base.module
    assert [(w.name, s) for w, s in component.loras] == [("a.safetensors", 0.5), ("b.safetensors", 2.0)]
    assert [(w.name, s) for w, s in one.transformer.get().loras] == [("a.safetensors", 0.5)]
    assert core_lora.load_lora(p1, FLUX_LORA) is core_lora.load_lora(p1, FLUX_LORA)  # read once while in use


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(base, tmp_path, dtype):
    path, layers, space = write_lora(tmp_path / "p.safetensors", base.module, "peft")
    weights = core_lora.read_lora(path, FLUX_LORA)
    half = Component(copy.deepcopy(base.module).to(dtype), "diffusion", "half", dtype)
    inputs = _inputs(base.module)
    before = _run(half.module, inputs, dtype)
    with core_lora.applied_loras(half, ((weights, 0.25),)):
        out = _run(half.module, inputs, dtype)
    reference = _run(merged(base.module, (layers, space, 0.25)), inputs)
    base_error = (before - _run(base.module, inputs)).abs().max()  # what the dtype alone costs
    change = (reference - _run(base.module, inputs)).abs().max()
    error = (out - reference).abs().max()
    assert error < 3 * base_error and change > 10 * base_error, (float(error), float(base_error), float(change))
    assert out.dtype == F32 and torch.equal(lora_run(half, (weights, 0.0), inputs=inputs), before)
    assert torch.equal(_run(half.module, inputs, dtype), before)


def _as_dense(module):
    """A dense copy of a quantized transformer: each linear's weights read through the layer's own forward.

    ``layer(0) = b`` and ``layer(I) = W^T + b`` give exactly the numbers the layer multiplies by, whatever
    its dequantization does, so the reference does not depend on how a GGUF layer is implemented.
    """
    from diffusers import FluxTransformer2DModel

    dense = FluxTransformer2DModel.from_config(module.config)
    sd = {k: v for k, v in module.state_dict().items() if not hasattr(v, "quant_type")}
    with torch.inference_mode():
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear):
                bias = layer(torch.zeros(1, layer.in_features))[0]
                sd[f"{name}.weight"] = (layer(torch.eye(layer.in_features)) - bias).T.clone()
                if layer.bias is not None:
                    sd[f"{name}.bias"] = bias.clone()
    dense.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return dense.eval()


def test_gguf_layers_keep_their_quantized_weights(tiny_models, tmp_path):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    gguf = transformer_source(None, tiny_models / "diffusion_models" / "flux1-fill-dev-Q8_0.gguf", F32).get()
    module = gguf.module
    assert isinstance(module.get_submodule("transformer_blocks.0.attn.to_q"), GGUFLinear)
    packed = {k: v.clone() for k, v in module.state_dict().items()}
    dense = _as_dense(module)
    path, layers, space = write_lora(tmp_path / "k.safetensors", dense, "kohya")
    weights = core_lora.read_lora(path, FLUX_LORA)
    inputs = _inputs(module)
    before = _run(module, inputs)
    assert torch.allclose(_run(dense, inputs), before, atol=1e-5, rtol=0)  # the reference is the GGUF model
    with core_lora.applied_loras(gguf, ((weights, 1.0),)):
        out = _run(module, inputs)
    reference = _run(merged(dense, (layers, space, 1.0)), inputs)
    assert (out - before).abs().max() > 1e-2
    assert torch.allclose(out, reference, atol=1e-5, rtol=0), (out - reference).abs().max()
    assert torch.equal(_run(module, inputs), before)
    assert all(torch.equal(v, packed[k]) for k, v in module.state_dict().items())  # still quantized, unchanged


# --------------------------------------------------------------------------------------------------------------
# Bad input


def _flux_error(path):
    with pytest.raises(ModelFileError) as info:
        core_lora.read_lora(path, FLUX_LORA)
    message = str(info.value)
    assert f"'{path.name}'" in message and "Expected a FLUX.1 LoRA" in message
    return message


def test_lora_of_another_family_is_named(tmp_path):
    down, up = torch.randn(4, 3072), torch.randn(3072, 4)
    qwen = _write(tmp_path / "qwen_style.safetensors", {
        "transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight": down.clone(),
        "transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_B.weight": up.clone(),
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up,
    })
    assert "This is a LoRA for Qwen-Image, not for FLUX.1" in _flux_error(qwen)
    sdxl = _write(tmp_path / "sdxl_style.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.randn(4, 640),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.randn(640, 4),
        "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(4.0),
    })
    assert "LoRA for Stable Diffusion 1.x/2.x/XL (UNet), not for FLUX.1" in _flux_error(sdxl)


def test_no_matching_keys_and_unsupported_tensors(tmp_path):
    plain = _write(tmp_path / "not_a_lora.safetensors", {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3)})
    message = _flux_error(plain)
    assert "No FLUX.1 transformer LoRA layers" in message and "encoder.conv_in.weight" in message
    lokr = _write(tmp_path / "lokr.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lokr_w1": torch.randn(4, 4),
        "transformer.transformer_blocks.0.attn.to_q.lokr_w2": torch.randn(32, 32),
    })
    assert "cannot apply" in _flux_error(lokr)
    half = _write(tmp_path / "half.safetensors", {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight":
                                                  torch.randn(4, 128)})
    assert "'transformer_blocks.0.attn.to_q' has no up matrix" in _flux_error(half)


def test_corrupt_and_truncated_files(tmp_path, base):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file" * 10)
    assert "corrupt" in _flux_error(garbage)
    good, _, _ = write_lora(tmp_path / "good.safetensors", base.module, "peft")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "corrupt" in _flux_error(truncated)
    assert "LoRA file not found" in _flux_error(tmp_path / "missing.safetensors")


def test_lora_for_another_size_is_refused_when_sampling(base, tmp_path, tiny_models):
    """A FLUX.1-dev LoRA that trains x_embedder (64 inputs) does not fit FLUX.1-Fill (384)."""
    dev_lora = _write(tmp_path / "dev_lora.safetensors", {
        "transformer.x_embedder.lora_A.weight": torch.randn(4, 64),
        "transformer.x_embedder.lora_B.weight": torch.randn(128, 4),
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 128),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 4),
    })
    model = FluxModel(transformer_source(tiny_models / "diffusers" / "FLUX.1-Fill-dev", None, F32), {})
    lorad = core_lora.add_lora(model, FLUX_LORA, dev_lora, 1.0)
    with pytest.raises(EditKitError, match=r"LoRA 'dev_lora.safetensors' does not fit this FLUX.1 transformer: 1 of "
                                           r"its 2 layers .*x_embedder: LoRA 64->128 features, model 384->128"):
        lorad.transformer.get()
    assert not any(m._forward_hooks for m in base.module.modules())


# --------------------------------------------------------------------------------------------------------------
# The node


class _Recording(TorchRuntime):
    """A CPU runtime that records what samplers hand to it."""

    def __init__(self):
        super().__init__("cpu")
        self.seen = []

    def acquire(self, component, memory_required=0):
        self.seen.append(component)
        return super().acquire(component, memory_required)


def test_lora_node_end_to_end_through_fill(models_root, base):
    """Loader → LoRA → Fill inpaint equals Fill on independently merged weights; the runtime only sees the base."""
    from editkit.nodes import comfy_bridge

    runtime = _Recording()
    comfy_bridge.set_runtime(runtime)
    try:
        _node_end_to_end(models_root, base, runtime)
    finally:
        comfy_bridge.set_runtime(None)


def _node_end_to_end(models_root, base, runtime):
    from editkit.nodes.flux_nodes import EditKitFluxFillInpaint, EditKitFluxLoader
    from editkit.nodes.lora_nodes import EditKitFluxLora

    path, layers, space = write_lora(models_root / "loras" / "editkit_test" / "style.safetensors", base.module,
                                     "kohya")
    spec = EditKitFluxLora.INPUT_TYPES()["required"]
    assert "editkit_test/style.safetensors" in spec["lora_name"][0]
    assert spec["strength"][1]["default"] == 1.0 and (spec["strength"][1]["min"], spec["strength"][1]["max"]) == (-4, 4)
    assert EditKitFluxLora.RETURN_TYPES == ("EDITKIT_FLUX",) and EditKitFluxLora.RETURN_NAMES == ("model",)

    model, _text, vae = call_node(EditKitFluxLoader, diffusers_folder="FLUX.1-Fill-dev", weight_dtype="fp32")
    assert model.transformer.get() is base
    g = torch.Generator().manual_seed(9)
    conditioning = [[torch.randn(1, 6, 32, generator=g), {"pooled_output": torch.randn(1, 64, generator=g)}]]
    image = torch.rand(1, 32, 48, 3, generator=g)
    mask = torch.zeros(1, 32, 48)
    mask[:, 8:24, 8:40] = 1

    def inpaint(m):
        return call_node(EditKitFluxFillInpaint, model=m, vae=vae, conditioning=conditioning, image=image, mask=mask,
                         seed=3, steps=2)[1]["samples"]

    before = inpaint(model)
    (lorad,) = call_node(EditKitFluxLora, model=model, lora_name="editkit_test/style.safetensors", strength=0.9)
    (off,) = call_node(EditKitFluxLora, model=model, lora_name="editkit_test/style.safetensors", strength=0.0)
    runtime.seen.clear()
    out = inpaint(lorad)
    assert base in runtime.seen and not any(isinstance(c, core_lora.LoraComponent) for c in runtime.seen)
    merged_model = FluxModel(_Fixed(Component(merged(base.module, (layers, space, 0.9)), "diffusion", "m", F32)),
                             model.scheduler_config)
    reference = inpaint(merged_model)
    assert (out - before).abs().max() > 1e-3
    assert torch.allclose(out, reference, atol=1e-5, rtol=0), (out - reference).abs().max()
    assert torch.equal(inpaint(off), before)  # strength 0
    assert torch.equal(inpaint(model), before)  # the same model without the LoRA node: exactly the base


class _Fixed:
    """A model handle over a ready component (the merged reference)."""

    def __init__(self, component):
        self.component = component

    def get(self):
        return self.component


def test_lora_node_contract():
    from editkit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from editkit.nodes.lora_nodes import EditKitFluxLora

    assert NODE_CLASS_MAPPINGS["EditKitFluxLora"] is EditKitFluxLora
    assert NODE_DISPLAY_NAME_MAPPINGS["EditKitFluxLora"] == "EditKit · Flux LoRA"
    assert EditKitFluxLora.CATEGORY == "EditKit/flux" and EditKitFluxLora.DESCRIPTION
    for name, value in EditKitFluxLora.INPUT_TYPES()["required"].items():
        assert value[1].get("tooltip"), name


def test_lora_node_in_comfyuis_executor(comfyui, tiny_models):
    """Loader → LoRA → Fill inpaint in ComfyUI's real executor; removing the node gives the base result exactly."""
    from diffusers import FluxTransformer2DModel

    from tiny.flux1 import TINY_TRANSFORMER

    comfyui.folder_paths.add_model_folder_path("loras", str(tiny_models / "loras"), is_default=True)
    comfyui.folder_paths.filename_list_cache.pop("loras", None)
    reference = FluxTransformer2DModel(**TINY_TRANSFORMER)  # only its layer sizes are used
    write_lora(tiny_models / "loras" / "editkit_comfy" / "comfy_style.safetensors", reference, "comfy_down_up")
    _write(tiny_models / "loras" / "editkit_comfy" / "qwen_style.safetensors", {
        "transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight": torch.randn(4, 128),
        "transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_B.weight": torch.randn(512, 4),
    })

    def prompt(*loras):
        graph = {
            "1": {"class_type": "EditKitFluxLoader", "inputs": {
                "diffusers_folder": "FLUX.1-Fill-dev", "transformer_file": "(from folder)", "vae_file": "(from folder)",
                "clip_l_file": "(from folder)", "t5_file": "(from folder)", "weight_dtype": "fp32"}},
            "2": {"class_type": "EditKitFluxTextEncode", "inputs": {"text_encoders": ["1", 1], "prompt": "a bowl",
                                                                     "max_sequence_length": 64}},
            "3": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 32, "batch_size": 1,
                                                         "color": 0x808080}},
            "4": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 48, "height": 32}},
        }
        model = ["1", 0]
        for i, (name, strength) in enumerate(loras):
            graph[f"l{i}"] = {"class_type": "EditKitFluxLora",
                              "inputs": {"model": model, "lora_name": name, "strength": strength}}
            model = [f"l{i}", 0]
        graph["5"] = {"class_type": "EditKitFluxFillInpaint", "inputs": {
            "model": model, "vae": ["1", 2], "conditioning": ["2", 0], "image": ["3", 0], "mask": ["4", 0],
            "seed": 1, "steps": 2, "guidance": 30.0, "denoise": 1.0, "batch_size": 1}}
        graph["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}
        return graph

    def latent(*loras):
        run = comfyui.run(prompt(*loras))
        assert run.success, run.error()
        return run.output("5", 1)["samples"].clone()

    style = "editkit_comfy/comfy_style.safetensors"
    base = latent()
    with_lora = latent((style, 1.0))
    assert (with_lora - base).abs().max() > 1e-3
    assert torch.equal(latent((style, 0.0)), base)
    assert torch.allclose(latent((style, 0.5), (style, 0.5)), with_lora, atol=1e-5, rtol=0)  # chained
    assert torch.equal(latent(), base)  # the node removed: the base model's result exactly

    run = comfyui.run(prompt(("editkit_comfy/qwen_style.safetensors", 1.0)))
    error = run.error()
    assert not run.success and error["node_type"] == "EditKitFluxLora"
    assert "This is a LoRA for Qwen-Image, not for FLUX.1" in error["exception_message"]
