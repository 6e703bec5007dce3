"""Single-file text encoders (ComfyUI's files) equal transformers' own load of the same weights, in bf16/fp16 too.

The reference for each encoder is transformers' ``from_pretrained`` of the diffusers folder holding the same
weights (the tiny trees write both from one set of numbers), in the same dtype: that is what keeps the rotary
embeddings' inverse frequencies in float32 in a bf16 model and T5's ``wo`` in float32 in fp16. Loading a single
file must give that model, buffer for buffer and dtype for dtype, and the same encoder states; against the
float32 model the bf16 states then differ only by bf16 arithmetic. (Fault 5: Qwen2.5-VL from a single file
computed RoPE from bf16 frequencies; its states differed from transformers' bf16 load of the same weights.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux import text as flux_text
from editkit.pipelines.qwen_image import text as qwen_text
from editkit.pipelines.qwen_image.loading import EDIT_2509
from editkit.pipelines.zimage import text as zimage_text
from tiny import zimage as zm
from tiny.qwen_image import FAMILY as QWEN
from tiny.qwen_image import FILES

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
RUNTIME = TorchRuntime("cpu")


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _same_module(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Every parameter and buffer of ``ours`` has the reference's name, dtype and value."""
    mine = dict(ours.named_parameters()) | dict(ours.named_buffers())
    theirs = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert sorted(mine) == sorted(theirs)
    for name, tensor in mine.items():
        assert tensor.dtype == theirs[name].dtype, (name, tensor.dtype, theirs[name].dtype)
        assert torch.equal(tensor, theirs[name]), name


def _rotary_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if "rotary" in n or n.endswith("inv_freq")}


# --------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL (Qwen-Image-Edit's encoder): the fault


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    paths = QWEN.tree(tmp_path_factory.mktemp("qwen_text"))["paths"]
    return paths["folder"], paths["folder"].parents[1] / "text_encoders" / FILES["te_bf16"]


def _qwen_states(encoder) -> torch.Tensor:
    """Two pictures and a long instruction: about 1,000 tokens, so late positions are reached."""
    pictures = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (224, 224, 3), dtype=np.uint8))
                for i in range(2)]
    return encoder.encode("put the jacket of picture 2 on the person in picture 1, " * 14, pictures, EDIT_2509,
                          RUNTIME)


def test_qwen25vl_from_a_single_file_keeps_fp32_rotary_in_bf16(qwen):
    folder, file = qwen
    single = qwen_text.text_encoder_source(folder, file, BF16).get()
    reference = qwen_text.text_encoder_source(folder, None, BF16).get()  # transformers' own load, bf16
    full = qwen_text.text_encoder_source(folder, None, F32).get()
    rotary = _rotary_buffers(single.component.module)
    assert {n.split(".")[0] for n in rotary} == {"language_model", "visual"}
    assert all(b.dtype == F32 for b in rotary.values()), {n: b.dtype for n, b in rotary.items()}
    _same_module(single.component.module, reference.component.module)
    assert single.component.module.language_model.layers[0].self_attn.q_proj.weight.dtype == BF16

    # The rotation a bf16 model applies at late positions is the float32 model's (rounded to bf16 once).
    positions = torch.arange(4096).view(1, 1, -1).expand(3, 1, -1)
    probe = torch.zeros(1, 1, 8, dtype=BF16)
    cos, sin = single.component.module.language_model.rotary_emb(probe, positions)
    cos32, sin32 = full.component.module.language_model.rotary_emb(probe.float(), positions)
    assert torch.equal(cos, cos32.to(BF16)) and torch.equal(sin, sin32.to(BF16))

    states, expected, states32 = _qwen_states(single), _qwen_states(reference), _qwen_states(full)
    assert states.shape[1] > 900
    assert torch.equal(states, expected)  # the single file gives transformers' bf16 encoder exactly
    assert _relative_l2(states, states32) == pytest.approx(_relative_l2(expected, states32))


def _fp8_linears(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype in FP8}


def _effective(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers as a forward computes with them: fp8 weights times their layer's scale."""
    out = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, layer in _fp8_linears(module).items():
        out[f"{name}.weight"] = layer.weight.to(layer.compute_dtype) * layer.weight_scale
    return out


def test_qwen25vl_fp8_scaled_file_keeps_fp8_in_memory_and_fp32_rotary(qwen):
    """qwen_2.5_vl_7b_fp8_scaled: the Linear weights stay fp8 (cast per call with their scale), rotary stays fp32,
    the rest is transformers' bf16 load of the same numbers; the encoder states equal that load's."""
    from editkit.pipelines.core.precision import CastLinear

    folder, file = qwen
    scaled = file.parent / FILES["te_fp8"]
    single = qwen_text.text_encoder_source(folder, scaled, BF16).get()
    reference = qwen_text.text_encoder_source(folder, None, BF16).get()
    module = single.component.module
    kept = _fp8_linears(module)
    layers = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(kept) == len(layers) and all(type(m) is CastLinear and m.compute_dtype == BF16 for m in kept.values())
    assert all(b.dtype == F32 for b in _rotary_buffers(module).values())
    mine, theirs = _effective(module), _effective(reference.component.module)
    assert sorted(mine) == sorted(theirs)
    for name, tensor in mine.items():  # fp8 x scale is exact in the tiny weights
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    torch.testing.assert_close(_qwen_states(single), _qwen_states(reference), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Qwen3 (Z-Image's encoder)


def test_qwen3_from_a_single_file_equals_transformers_load(tiny_models):
    folder = tiny_models / "diffusers" / zm.FOLDER
    file = tiny_models / "text_encoders" / zm.TEXT_ENCODER_FILE
    single = zimage_text.text_encoder_source(folder, file, BF16).get()
    reference = zimage_text.text_encoder_source(folder, None, BF16).get()
    full = zimage_text.text_encoder_source(folder, None, F32).get()
    assert all(b.dtype == F32 for b in _rotary_buffers(single.encoder.module).values())
    _same_module(single.encoder.module, reference.encoder.module)
    prompt = "a portrait of a woman with freckles, soft window light " * 8
    states = single.encode(prompt, RUNTIME)
    assert torch.equal(states, reference.encode(prompt, RUNTIME))
    assert _relative_l2(states, full.encode(prompt, RUNTIME)) < 2e-2  # bf16 arithmetic only


# --------------------------------------------------------------------------------------------------------------
# CLIP-L and T5-XXL (FLUX.1's encoders)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_clip_and_t5_from_single_files_equal_transformers_load(tiny_models, dtype):
    folder = tiny_models / "diffusers" / "FLUX.1-Fill-dev"
    clip_file, t5_file = tiny_models / "text_encoders" / "clip_l.safetensors", tiny_models / "text_encoders" / \
        "t5xxl_fp16.safetensors"
    single = flux_text.text_encoder_source(folder, clip_file, t5_file, dtype).get()
    reference = flux_text.text_encoder_source(folder, None, None, dtype).get()
    _same_module(single.clip.module, reference.clip.module)
    _same_module(single.t5.module, reference.t5.module)
    wo = single.t5.module.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == (F32 if dtype == F16 else dtype)  # transformers' _keep_in_fp32_modules in fp16
    assert single.t5.module.shared.weight is single.t5.module.encoder.embed_tokens.weight  # tied
    prompt = ["a bowl of fruit on a wooden table"]
    states, pooled = single.encode(prompt, RUNTIME, 64)
    ref_states, ref_pooled = reference.encode(prompt, RUNTIME, 64)
    assert torch.equal(states, ref_states) and torch.equal(pooled, ref_pooled)


@pytest.mark.parametrize("variant", ["e4m3fn", "scaled"])
def test_t5_fp8_file_keeps_fp8_in_memory_and_equals_casting_up_front(tiny_models, tmp_path, variant):
    """t5xxl_fp8_e4m3fn (and a scaled-fp8 T5): Linear weights stay fp8 except ``wo`` (transformers casts its
    input to its weight's dtype: fp8 there would round the activations) and the embeddings (widened)."""
    import safetensors.torch

    folder = tiny_models / "diffusers" / "FLUX.1-Fill-dev"
    clip_file = tiny_models / "text_encoders" / "clip_l.safetensors"
    sd = safetensors.torch.load_file(str(tiny_models / "text_encoders" / "t5xxl_fp16.safetensors"))
    scale = 2.0 ** -6 if variant == "scaled" else 1.0
    file, reference = {}, {}
    for key, tensor in sd.items():
        if tensor.ndim == 2 and key.endswith(".weight"):
            file[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            reference[key] = file[key].float() * scale
            if variant == "scaled":
                file[key[: -len(".weight")] + ".scale_weight"] = torch.tensor(scale)
        else:
            file[key], reference[key] = tensor, tensor.float()
    if variant == "scaled":
        file["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    safetensors.torch.save_file(file, str(tmp_path / "t5_fp8.safetensors"))
    safetensors.torch.save_file(reference, str(tmp_path / "t5_reference.safetensors"))
    single = flux_text.text_encoder_source(folder, clip_file, tmp_path / "t5_fp8.safetensors", F32).get()
    upfront = flux_text.text_encoder_source(folder, clip_file, tmp_path / "t5_reference.safetensors", F32).get()
    t5 = single.t5.module
    linears = {n: m for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n in linears if n not in _fp8_linears(t5)} == {n for n in linears if n.endswith(".wo")}
    assert all(p.dtype in (F32, torch.float8_e4m3fn) for p in t5.parameters())
    assert t5.shared.weight.dtype == F32 and t5.shared.weight is t5.encoder.embed_tokens.weight
    prompt = ["a bowl of fruit on a wooden table"]
    states, _pooled = single.encode(prompt, RUNTIME, 64)
    ref_states, _ref_pooled = upfront.encode(prompt, RUNTIME, 64)
    torch.testing.assert_close(states, ref_states, rtol=1e-5, atol=1e-5)


def test_t5_fp8_placeholders_are_never_materialised(tiny_models, tmp_path, monkeypatch):
    """Beyond the file's tensors, loading allocates only the tensors the model holds widened (embeddings, ``wo``,
    norms in the compute dtype): the zero-stride placeholders transformers' loader gets for the kept fp8 weights
    never become real tensors (that would add the kept weights' size in the compute dtype)."""
    import safetensors.torch
    from fp8_files import LiveBytes

    sd = safetensors.torch.load_file(str(tiny_models / "text_encoders" / "t5xxl_fp16.safetensors"))
    file = {k: t.to(torch.float8_e4m3fn) if t.ndim == 2 and k.endswith(".weight") else t for k, t in sd.items()}
    path = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    safetensors.torch.save_file(file, str(path))
    counted = LiveBytes()
    read = flux_text.read_state_dict
    monkeypatch.setattr(flux_text, "read_state_dict", lambda *args: counted.adopt(read(*args)))
    with counted:
        t5 = flux_text._t5_from_file(path, F32)
    unique = {id(t): t for t in t5.parameters()}.values()
    held_wide = sum(t.numel() * 4 for t in unique if t.dtype == F32)
    kept_wide = sum(t.numel() * 4 for t in unique if t.dtype == torch.float8_e4m3fn)
    assert kept_wide > 0
    assert counted.peak < path.stat().st_size + held_wide + kept_wide / 2, (counted.peak, kept_wide)


def test_qwen3_scaled_fp8_file_keeps_fp8_in_memory_and_equals_casting_up_front(tiny_models, tmp_path):
    """A scaled-fp8 qwen_3_4b (Z-Image's and FLUX.2's encoder): Linear weights stay fp8 with fp32 rotary, and the
    prompt states are those of the same numbers cast up front."""
    import safetensors.torch

    folder = tiny_models / "diffusers" / zm.FOLDER
    sd = safetensors.torch.load_file(str(tiny_models / "text_encoders" / zm.TEXT_ENCODER_FILE))
    scale = 2.0 ** -6
    file, reference = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for key, tensor in sd.items():
        if tensor.ndim == 2 and key.endswith(".weight"):
            file[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            file[key[: -len(".weight")] + ".scale_weight"] = torch.tensor(scale)
            reference[key] = file[key].float() * scale
        else:
            file[key], reference[key] = tensor, tensor.float()
    safetensors.torch.save_file(file, str(tmp_path / "qwen_3_4b_fp8_scaled.safetensors"))
    safetensors.torch.save_file(reference, str(tmp_path / "qwen_3_4b_reference.safetensors"))
    single = zimage_text.text_encoder_source(folder, tmp_path / "qwen_3_4b_fp8_scaled.safetensors", F32).get()
    upfront = zimage_text.text_encoder_source(folder, tmp_path / "qwen_3_4b_reference.safetensors", F32).get()
    module = single.encoder.module
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale == scale for m in linears)
    assert all(b.dtype == F32 for b in _rotary_buffers(module).values())
    prompt = "a portrait of a woman with freckles, soft window light"
    torch.testing.assert_close(single.encode(prompt, RUNTIME), upfront.encode(prompt, RUNTIME), rtol=1e-5, atol=1e-5)
