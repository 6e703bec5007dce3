"""Every FLUX.1 loading path gives the same model; bad files give errors that name them."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from editkit.pipelines.core.errors import EditKitError, ModelFileError
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux import layout as flux_layout
from editkit.pipelines.flux.flow import text_ids, token_ids
from editkit.pipelines.flux.loading import transformer_source, vae_source
from editkit.pipelines.flux.text import text_encoder_source

F32 = torch.float32


@pytest.fixture(scope="module")
def folder(tiny_models):
    return tiny_models / "diffusers" / "FLUX.1-Fill-dev"


def _forward(component, seed=0):
    """One transformer call on fixed random inputs (a 64x64 image: 16 tokens, 7 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    config = component.module.config
    with torch.inference_mode():
        return component.module(
            hidden_states=torch.randn(1, 16, config.in_channels, generator=g),
            timestep=torch.tensor([0.6]),
            guidance=torch.tensor([30.0]),
            pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
            encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim, generator=g),
            txt_ids=text_ids(7),
            img_ids=token_ids(8, 8),
            return_dict=False,
        )[0]


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_transformer_paths_agree(folder, tiny_models, tmp_path):
    reference = transformer_source(folder, None, F32).get()
    bfl = transformer_source(None, tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors", F32).get()
    assert _same_weights(reference.module, bfl.module)
    assert bfl.module.config.in_channels == 384 and bfl.module.config.num_attention_heads == 1

    # ComfyUI-saved files carry a "model.diffusion_model." prefix; diffusers-key single files exist too.
    raw = load_file(str(tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors"))
    save_file({flux_layout.COMFY_PREFIX + k: v for k, v in raw.items()}, str(tmp_path / "prefixed.safetensors"))
    save_file({k: v.contiguous() for k, v in reference.module.state_dict().items()},
              str(tmp_path / "diffusers_keys.safetensors"))
    prefixed = transformer_source(None, tmp_path / "prefixed.safetensors", F32).get()
    diffusers_keys = transformer_source(None, tmp_path / "diffusers_keys.safetensors", F32).get()
    assert _same_weights(reference.module, prefixed.module)
    assert _same_weights(reference.module, diffusers_keys.module)

    expected = _forward(reference)
    for other in (bfl, prefixed, diffusers_keys):
        torch.testing.assert_close(_forward(other), expected, atol=1e-5, rtol=1e-5)


def test_gguf_stays_quantized_and_matches_within_q8_tolerance(folder, tiny_models):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    reference = transformer_source(folder, None, F32).get()
    gguf = transformer_source(None, tiny_models / "diffusion_models" / "flux1-fill-dev-Q8_0.gguf", F32).get()
    assert gguf.quantized
    weight = gguf.module.transformer_blocks[0].attn.to_q.weight
    assert isinstance(weight, GGUFParameter) and weight.dtype == torch.uint8
    assert weight.quant_type.name == "Q8_0"
    quantized_bytes = sum(p.numel() * p.element_size() for p in gguf.module.parameters())
    dense_bytes = sum(p.numel() * p.element_size() for p in reference.module.parameters())
    assert quantized_bytes < 0.4 * dense_bytes  # ~1 byte per weight instead of 4
    expected, got = _forward(reference), _forward(gguf)
    error = (got - expected).abs().max().item()
    assert 0 < error < 0.03 * expected.abs().max().item()  # Q8_0 rounding: small but not zero


@pytest.mark.parametrize("quant, tolerance", [("Q5_1", 0.08), ("Q4_0", 0.15)])
def test_other_gguf_quantizations_load(folder, tiny_models, tmp_path, quant, tolerance):
    from tiny.core import write_gguf

    write_gguf(load_file(str(tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors")),
               tmp_path / f"fill-{quant}.gguf", quant)
    loaded = transformer_source(None, tmp_path / f"fill-{quant}.gguf", F32).get()
    assert loaded.module.transformer_blocks[0].attn.to_q.weight.quant_type.name == quant
    expected = _forward(transformer_source(folder, None, F32).get())
    error = (_forward(loaded) - expected).abs().max().item()
    assert 0 < error < tolerance * expected.abs().max().item()


def test_vae_paths_agree(folder, tiny_models):
    reference = vae_source(folder, None, F32).get()
    bfl = vae_source(None, tiny_models / "vae" / "ae.safetensors", F32).get()
    assert _same_weights(reference.module, bfl.module)
    assert bfl.module.config.scaling_factor == pytest.approx(0.3611)
    assert bfl.module.config.shift_factor == pytest.approx(0.1159)


def _encode(encoders, prompt="a bowl of oranges"):
    return encoders.encode([prompt], TorchRuntime("cpu"))


def test_text_encoder_paths_agree(folder, tiny_models, tmp_path):
    enc = tiny_models / "text_encoders"
    reference = _encode(text_encoder_source(folder, None, None, F32).get())
    singles = _encode(text_encoder_source(folder, enc / "clip_l.safetensors", enc / "t5xxl_fp16.safetensors", F32).get())
    torch.testing.assert_close(singles[0], reference[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(singles[1], reference[1], atol=1e-6, rtol=1e-6)
    assert reference[0].shape == (1, 512, 32) and reference[1].shape == (1, 64)

    # bf16, fp8 and ComfyUI's scaled-fp8 storage of T5 load too (values rounded by the storage).
    t5 = load_file(str(enc / "t5xxl_fp16.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in t5.items()}, str(tmp_path / "t5_bf16.safetensors"))
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and "embed" not in k and "shared" not in k else v)
           for k, v in t5.items()}
    save_file(fp8, str(tmp_path / "t5_fp8.safetensors"))
    scaled = {}
    for k, v in t5.items():
        if v.ndim == 2 and "shared" not in k:
            scale = v.float().abs().max() / 448.0
            scaled[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            scaled[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            scaled[k] = v
    scaled["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, str(tmp_path / "t5_scaled_fp8.safetensors"))
    for name, tolerance in (("t5_bf16", 0.02), ("t5_fp8", 0.3), ("t5_scaled_fp8", 0.3)):
        states = _encode(text_encoder_source(folder, None, tmp_path / f"{name}.safetensors", F32).get())[0]
        error = (states - reference[0]).abs().max().item()
        assert error < tolerance * reference[0].abs().max().item(), name


def test_text_encoding_matches_diffusers_flux_pipeline(folder):
    from diffusers import FluxPipeline

    encoders = text_encoder_source(folder, None, None, F32).get()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=encoders.clip.module, tokenizer=encoders.clip_tokenizer,
                        text_encoder_2=encoders.t5.module, tokenizer_2=encoders.t5_tokenizer, transformer=None)
    with torch.inference_mode():
        states, pooled, _ = pipe.encode_prompt("a red cat", None, device="cpu", max_sequence_length=512)
    ours = _encode(encoders, "a red cat")
    torch.testing.assert_close(ours[0], states.float())
    torch.testing.assert_close(ours[1], pooled.float())


def test_same_file_is_loaded_once_while_in_use(tiny_models):
    path = tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors"
    first = transformer_source(None, path, F32).get()
    assert transformer_source(None, path, F32).get() is first
    assert transformer_source(None, path, torch.bfloat16).get() is not first  # another dtype is another model
    alive = weakref.ref(first)
    del first
    gc.collect()
    assert alive() is None  # the cache holds weak references only: ComfyUI's "free memory" really frees
    assert transformer_source(None, path, F32).get().module.config.in_channels == 384


def test_layout_round_trip_is_exact(folder):
    reference = transformer_source(folder, None, F32).get().module.state_dict()
    back = flux_layout.bfl_transformer_to_diffusers(flux_layout.diffusers_transformer_to_bfl(reference))
    assert set(back) == set(reference)
    assert all(torch.equal(back[k], reference[k]) for k in reference)


def test_real_width_layout_matches_diffusers_converter():
    """At FLUX.1's real width our split of linear1 equals diffusers' own (shapes via meta tensors)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(in_channels=384, out_channels=64, num_layers=1, num_single_layers=2,
                                       guidance_embeds=True)
    bfl = flux_layout.diffusers_transformer_to_bfl(model.state_dict())
    ours = flux_layout.bfl_transformer_to_diffusers(dict(bfl))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(ours) == set(theirs) == set(model.state_dict())
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize("kind", ["missing", "vae_as_transformer", "garbage", "truncated"])
def test_bad_transformer_files_give_clear_errors(tiny_models, tmp_path, kind):
    if kind == "missing":
        path = tmp_path / "nope.safetensors"
        match = "Model file not found"
    elif kind == "vae_as_transformer":
        path = tiny_models / "vae" / "ae.safetensors"
        match = "Not a FLUX.1 transformer"
    elif kind == "garbage":
        path = tmp_path / "garbage.safetensors"
        path.write_bytes(b"not a safetensors file at all")
        match = "Cannot read the file"
    else:
        source = (tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors").read_bytes()
        path = tmp_path / "truncated.safetensors"
        path.write_bytes(source[: len(source) // 2])
        match = "Cannot read the file"
    with pytest.raises(ModelFileError, match=match) as info:
        transformer_source(None, path, F32).get()
    message = str(info.value)
    assert path.name in message and str(path.parent) in message and "Expected a FLUX.1 transformer" in message


def test_wrong_text_encoder_files_are_named(folder, tiny_models):
    enc = tiny_models / "text_encoders"
    with pytest.raises(ModelFileError, match="Not a CLIP text encoder") as info:
        text_encoder_source(folder, enc / "t5xxl_fp16.safetensors", enc / "t5xxl_fp16.safetensors", F32).get()
    assert "t5xxl_fp16.safetensors" in str(info.value) and "clip_l" in str(info.value)
    with pytest.raises(ModelFileError, match="Not a T5 encoder"):
        text_encoder_source(folder, enc / "clip_l.safetensors", enc / "clip_l.safetensors", F32).get()
    with pytest.raises(ModelFileError, match="Not a VAE"):
        vae_source(None, enc / "clip_l.safetensors", F32).get()


def test_missing_sources_fail_only_when_used():
    lazy = text_encoder_source(None, None, None, F32)  # a loader output nobody uses must not fail the loader
    with pytest.raises(EditKitError, match="pick a diffusers folder"):
        lazy.get()
    with pytest.raises(EditKitError, match="No transformer"):
        transformer_source(None, None, F32).get()


def test_fp8_and_scaled_fp8_transformer_files(folder, tiny_models, tmp_path):
    """fp8-stored transformers keep their Linear weights in fp8 (cast per call); ComfyUI's scaled-fp8 files get
    their per-layer scales applied at that cast."""
    from editkit.pipelines.core.precision import CastLinear

    reference = transformer_source(folder, None, F32).get()
    bfl = load_file(str(tiny_models / "diffusion_models" / "flux1-fill-dev.safetensors"))
    plain, scaled = {}, {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in bfl.items():
        if value.ndim == 2:
            plain[key] = value.to(torch.float8_e4m3fn)
            scale = value.float().abs().max() / 448.0
            scaled[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            scaled[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            plain[key] = scaled[key] = value
    save_file(plain, str(tmp_path / "fp8.safetensors"))
    save_file(scaled, str(tmp_path / "fp8_scaled.safetensors"))
    expected = _forward(reference)
    for name in ("fp8", "fp8_scaled"):
        loaded = transformer_source(None, tmp_path / f"{name}.safetensors", F32).get()
        linears = [m for m in loaded.module.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m) is CastLinear and m.weight.dtype == torch.float8_e4m3fn for m in linears)
        assert {p.dtype for n, p in loaded.module.named_parameters() if p.dtype != torch.float8_e4m3fn} == {F32}
        error = (_forward(loaded) - expected).abs().max().item()
        assert error < 0.1 * expected.abs().max().item(), name
    # Without its scales the scaled file's weights are far off: the scales really were applied.
    layer = loaded.module.x_embedder
    weight = layer.weight.float() * layer.weight_scale
    raw = scaled["img_in.weight"].float()
    assert (weight - reference.module.x_embedder.weight).abs().max() < (raw - reference.module.x_embedder.weight).abs().max()
