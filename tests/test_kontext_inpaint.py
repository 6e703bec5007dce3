"""Kontext-inpaint: the widening identity, save/load round trips, mask and multi-round semantics."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import save_file

import editkit
from editkit.pipelines.core.errors import EditKitError
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux import flow
from editkit.pipelines.flux import kontext_inpaint as ki
from editkit.pipelines.flux.conditioning import FluxText
from editkit.pipelines.flux.family import FAMILY
from editkit.pipelines.flux.layout import diffusers_transformer_to_bfl
from editkit.pipelines.flux.loading import transformer_source, vae_source

F32 = torch.float32
_FRESH = itertools.count()


@pytest.fixture(scope="module")
def folder(tiny_models):
    return tiny_models / "diffusers" / "FLUX.1-Fill-dev"


def fresh_fill(folder):
    """A Fill transformer that no other test shares (widening modifies it in place)."""
    tag = f"test-fresh-{next(_FRESH)}"
    return transformer_source(folder, None, F32).derived(tag, lambda c: c, "fresh Fill").get()


@pytest.fixture(scope="module")
def widened(folder):
    component = fresh_fill(folder)
    ki.widen_fill_transformer(component.module)
    return component


def _call(module, hidden, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return module(
            hidden_states=hidden, timestep=torch.tensor([0.7]), guidance=torch.tensor([30.0]),
            pooled_projections=torch.randn(1, 64, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
            txt_ids=flow.text_ids(5), img_ids=flow.token_ids(8, 12), return_dict=False,
        )[0]


def test_widening_identity(folder, widened):
    """Widened(noisy, source, ANY mask image) == Fill(noisy, masked image = source, mask = 0)."""
    fill = transformer_source(folder, None, F32).get()
    g = torch.Generator().manual_seed(0)
    noisy, source = torch.randn(1, 24, 64, generator=g), torch.randn(1, 24, 64, generator=g)
    mask_image = torch.randn(1, 24, 64, generator=g) * 100  # arbitrary, even absurd, values
    fill_out = _call(fill.module, torch.cat([noisy, source, torch.zeros(1, 24, 256)], dim=-1))
    widened_out = _call(widened.module, torch.cat([noisy, source, mask_image], dim=-1))
    torch.testing.assert_close(widened_out, fill_out, atol=1e-5, rtol=1e-5)
    assert widened.module.config.in_channels == 192 and widened.module.config.out_channels == 64
    assert widened.module.x_embedder.weight.shape == (128, 192)
    assert torch.equal(widened.module.x_embedder.weight[:, :128], fill.module.x_embedder.weight[:, :128])
    assert torch.count_nonzero(widened.module.x_embedder.weight[:, 128:]) == 0
    assert torch.equal(widened.module.x_embedder.bias, fill.module.x_embedder.bias)


def test_small_random_init_option(folder):
    component = fresh_fill(folder)
    ki.widen_fill_transformer(component.module, init="small_random", std=1e-3, seed=1)
    new_columns = component.module.x_embedder.weight[:, 128:]
    assert torch.count_nonzero(new_columns) == new_columns.numel()
    assert 0.5e-3 < new_columns.std().item() < 2e-3
    with pytest.raises(EditKitError, match="needs FLUX.1-Fill \\(384 input features\\); this transformer has 192"):
        ki.widen_fill_transformer(component.module)
    with pytest.raises(EditKitError, match="Unknown init"):
        ki.widen_fill_transformer(fresh_fill(folder).module, init="ones")


def test_save_and_load_round_trip_in_both_formats(widened, tmp_path):
    trained = widened.module
    with torch.no_grad():  # stand-in for training: make the new columns non-zero
        trained.x_embedder.weight[:, 128:] = torch.linspace(-0.1, 0.1, 128 * 64).reshape(128, 64)
    trained.save_pretrained(str(tmp_path / "folder" / "transformer"))
    from_folder = transformer_source(tmp_path / "folder", None, F32).get()
    bfl = {k: v.contiguous() for k, v in diffusers_transformer_to_bfl(trained.state_dict()).items()}
    save_file(bfl, str(tmp_path / "flux1-kontext-inpaint.safetensors"))
    from_file = transformer_source(None, tmp_path / "flux1-kontext-inpaint.safetensors", F32).get()
    reference = trained.state_dict()
    for loaded in (from_folder, from_file):
        assert loaded.module.config.in_channels == 192
        state = loaded.module.state_dict()
        assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    with torch.no_grad():
        trained.x_embedder.weight[:, 128:] = 0


def _text(seed=0):
    g = torch.Generator().manual_seed(seed)
    return FluxText(torch.randn(1, 6, 32, generator=g), torch.randn(1, 64, generator=g), None)


@pytest.fixture(scope="module")
def vae(folder):
    return vae_source(folder, None, F32).get()


def _settings(folder, **kw):
    base = dict(steps=2, guidance=30.0, seed=9, denoise=1.0, scheduler_config=FAMILY.scheduler_config(folder),
                runtime=TorchRuntime("cpu"))
    base.update(kw)
    return base


def test_no_mask_equals_an_all_white_mask(folder, widened, vae):
    runtime = TorchRuntime("cpu")
    source = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(4))
    no_mask = ki.mask_image_latent(vae, None, 2, 64, 96, runtime)
    white = ki.mask_image_latent(vae, torch.ones(1, 1, 64, 96), 2, 64, 96, runtime)
    assert torch.equal(no_mask, white)
    a = ki.edit(widened, source, no_mask, _text(), **_settings(folder)).latents
    b = ki.edit(widened, source, white, _text(), **_settings(folder)).latents
    assert torch.equal(a, b)
    # A real mask changes the conditioning. The zero-initialised widening ignores it (that is the
    # identity property); a model whose mask-image columns are non-zero does not.
    partial = torch.zeros(1, 1, 64, 96)
    partial[..., :, :48] = 1
    partial_latent = ki.mask_image_latent(vae, partial, 2, 64, 96, runtime)
    assert not torch.allclose(partial_latent, white)
    assert torch.allclose(ki.edit(widened, source, partial_latent, _text(), **_settings(folder)).latents, a,
                          atol=1e-5)
    trained = fresh_fill(folder)
    ki.widen_fill_transformer(trained.module, init="small_random", std=0.05)
    assert not torch.allclose(ki.edit(trained, source, partial_latent, _text(), **_settings(folder)).latents,
                              ki.edit(trained, source, white, _text(), **_settings(folder)).latents)


def test_rounds_equal_chained_single_edits(folder, widened, vae):
    runtime = TorchRuntime("cpu")
    source = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(5))
    mask_latent = ki.mask_image_latent(vae, None, 1, 64, 96, runtime)
    texts = [_text(1), _text(2), _text(3)]
    history = ki.multi_round(widened, source, mask_latent, texts, **_settings(folder, seed=100))
    current = source
    for k, text in enumerate(texts):
        current = ki.edit(widened, current, mask_latent, text, **_settings(folder, seed=ki.round_seed(100, k))).latents
        assert torch.equal(history[k], current), f"round {k + 1}"
    assert not torch.allclose(history[0], history[1])


def test_references_are_extra_tokens_whose_predictions_are_dropped(folder, widened, vae):
    runtime = TorchRuntime("cpu")
    source = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(6))
    mask_latent = ki.mask_image_latent(vae, None, 1, 64, 96, runtime)
    reference = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(7))
    plain = ki.edit(widened, source, mask_latent, _text(), **_settings(folder)).latents
    with_ref = ki.edit(widened, source, mask_latent, _text(), references=[reference], **_settings(folder)).latents
    assert with_ref.shape == plain.shape == (1, 16, 8, 12)
    assert not torch.allclose(plain, with_ref)  # the reference tokens take part in attention


def test_bad_inputs(folder, widened, vae):
    runtime = TorchRuntime("cpu")
    with pytest.raises(EditKitError, match="Mask is 96x48 but the source is 96x64"):
        ki.mask_image_latent(vae, torch.ones(1, 1, 48, 96), 1, 64, 96, runtime)
    with pytest.raises(EditKitError, match="Got 2 masks for 3 sources"):
        ki.mask_image_latent(vae, torch.ones(2, 1, 64, 96), 3, 64, 96, runtime)
    odd = torch.randn(1, 16, 7, 12)
    with pytest.raises(EditKitError, match="multiples of 16"):
        ki.edit(widened, odd, torch.zeros(1, 16, 7, 12), _text(), **_settings(folder))
    fill = transformer_source(folder, None, F32).get()
    with pytest.raises(EditKitError, match="needs a transformer with 192 input features.*384"):
        ki.edit(fill, torch.randn(1, 16, 8, 12), torch.zeros(1, 16, 8, 12), _text(), **_settings(folder))


def test_loader_node_widens_a_private_copy(models_root, torch_runtime):
    """Widening on the fly must not change the Fill model other nodes share."""
    loader = editkit.NODE_CLASS_MAPPINGS["EditKitKontextInpaintLoader"]
    spec = loader.INPUT_TYPES()["required"]
    kwargs = {name: value[1].get("default", value[0][0]) for name, value in spec.items()}
    kwargs["transformer_file"] = "flux1-fill-dev.safetensors"
    model, _text_encoders, _vae = loader().load(**kwargs)
    shared_fill = transformer_source(None, models_root / "diffusion_models" / "flux1-fill-dev.safetensors",
                                     editkit.nodes.comfy_bridge.default_dtype()).get()
    widened_model = model.transformer.get()
    assert widened_model.module.config.in_channels == 192 and "widened" in widened_model.name
    assert shared_fill.module.config.in_channels == 384
    assert widened_model.module is not shared_fill.module


def test_no_device_mixing_between_compute_and_results(folder, tiny_models):
    """Compute on another device than where results are handed over (as on a GPU), simulated with the
    meta device: a CPU LATENT source, chained rounds and Fill all keep their tensors on one device."""
    from editkit.pipelines.flux import fill as fill_ops

    meta = TorchRuntime("meta", intermediate="meta")
    transformer = fresh_fill(folder)
    vae = vae_source(folder, None, F32).derived(f"meta-vae-{next(_FRESH)}", lambda c: c, "vae").get()
    pixels, mask = torch.rand(1, 3, 64, 96), torch.zeros(1, 1, 64, 96)
    mask[..., 16:48, 16:48] = 1
    result = fill_ops.fill(transformer, vae, pixels, mask, _text(), steps=2, guidance=30.0, seed=1, denoise=0.5,
                           per_image=2, scheduler_config=FAMILY.scheduler_config(folder), runtime=meta)
    assert result.images.device.type == "meta" and result.images.shape == (2, 3, 64, 96)
    ki.widen_fill_transformer(transformer.module)
    source = torch.randn(1, 16, 8, 12)  # a CPU LATENT from an earlier node
    mask_latent = ki.mask_image_latent(vae, None, 1, 64, 96, meta)
    history = ki.multi_round(transformer, source, mask_latent, [_text(1), _text(2)], steps=2, guidance=30.0,
                             seed=3, denoise=1.0, scheduler_config=FAMILY.scheduler_config(folder), runtime=meta)
    assert [h.device.type for h in history] == ["meta", "meta"]


@pytest.fixture()
def kontext_nodes(models_root, torch_runtime):
    from node_calls import call_node

    loader = editkit.NODE_CLASS_MAPPINGS["EditKitKontextInpaintLoader"]
    model, text_encoders, vae = call_node(loader, transformer_file="flux1-kontext-inpaint.safetensors")
    encode = editkit.NODE_CLASS_MAPPINGS["EditKitFluxTextEncode"]
    cond = call_node(encode, text_encoders=text_encoders, prompt="make it night")[0]
    return {"model": model, "vae": vae, "text_encoders": text_encoders, "conditioning": cond, "call": call_node}


def _edit(nodes, **inputs):
    node = editkit.NODE_CLASS_MAPPINGS["EditKitKontextInpaintEdit"]
    settings = dict(model=nodes["model"], vae=nodes["vae"], conditioning=nodes["conditioning"], steps=2, seed=5)
    settings.update(inputs)
    return nodes["call"](node, **settings)


def test_edit_node_batches_sources_masks_and_references(kontext_nodes):
    images = torch.rand(2, 64, 96, 3, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 64, 96)
    masks[0, :, :48] = 1
    masks[1, :, 48:] = 1
    pictures, latent = _edit(kontext_nodes, image=images, mask=masks, batch_size=2,
                             reference=torch.rand(1, 32, 32, 3))
    assert pictures.shape == (4, 64, 96, 3) and latent["samples"].shape == (4, 16, 8, 12)
    assert 0 <= pictures.min() and pictures.max() <= 1
    assert not torch.allclose(latent["samples"][0], latent["samples"][1])  # per-sample noise


def test_edit_node_chains_through_latents_like_multi_round(kontext_nodes):
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(2))
    encode = editkit.NODE_CLASS_MAPPINGS["EditKitFluxTextEncode"]
    multi = editkit.NODE_CLASS_MAPPINGS["EditKitKontextInpaintMultiRound"]
    lines = ["make it night", "add snow"]
    final, history, latent = kontext_nodes["call"](
        multi, model=kontext_nodes["model"], vae=kontext_nodes["vae"], text_encoders=kontext_nodes["text_encoders"],
        image=image, instructions="\n".join(lines), steps=2, seed=40,
    )
    assert history.shape == (2, 64, 96, 3) and torch.equal(final, history[-1:])
    current = {"image": image}
    for k, line in enumerate(lines):
        cond = kontext_nodes["call"](encode, text_encoders=kontext_nodes["text_encoders"], prompt=line)[0]
        _, chained = _edit(kontext_nodes, conditioning=cond, seed=ki.round_seed(40, k), **current)
        current = {"source_latent": chained}
    # Equal up to the float rounding of the LATENT's raw <-> model space conversion between nodes.
    torch.testing.assert_close(chained["samples"], latent["samples"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("samples, match", [
    (torch.zeros(1, 4, 8, 12), "needs a FLUX.1 LATENT"),
    (torch.zeros(1, 16, 1, 8, 12), "needs a FLUX.1 LATENT"),
    (torch.zeros(1, 16, 7, 12), "multiple of 16 pixels"),
])
def test_edit_node_refuses_wrong_latents_before_loading(kontext_nodes, samples, match):
    with pytest.raises(EditKitError, match=match):
        _edit(kontext_nodes, source_latent={"samples": samples})
    with pytest.raises(EditKitError, match="Connect a source"):
        _edit(kontext_nodes)


# --- issue 8 -----------------------------------------------------------------------------


def test_reference_token_ids_are_index_1_for_every_reference(folder, widened, vae, monkeypatch):
    """Position ids (1, row, col) for each reference, after the target's (0, row, col): the design contract
    (KONTEXT_INPAINT.md) and diffusers' Kontext; before issue 8 the k-th reference used index k."""
    references = [torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 6)]
    seen = []
    forward = widened.module.forward

    def recording(*args, **kwargs):
        seen.append(kwargs["img_ids"].clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(widened.module, "forward", recording)
    runtime = TorchRuntime("cpu")
    source = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(6))
    mask_latent = ki.mask_image_latent(vae, None, 1, 64, 96, runtime)
    ki.edit(widened, source, mask_latent, _text(), references=references, **_settings(folder, steps=1))
    target = [[0, r, c] for r in range(4) for c in range(6)]
    first = [[1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]  # 4x4 latent = 2x2 tokens
    second = [[1, 0, 0], [1, 0, 1], [1, 0, 2]]  # 2x6 latent = 1x3 tokens
    assert len(seen) == 1
    assert seen[0].tolist() == target + first + second


@pytest.fixture()
def widened_nodes(models_root, torch_runtime):
    from node_calls import call_node

    loader = editkit.NODE_CLASS_MAPPINGS["EditKitKontextInpaintLoader"]
    model, text_encoders, vae = call_node(loader, transformer_file="flux1-fill-dev.safetensors")
    encode = editkit.NODE_CLASS_MAPPINGS["EditKitFluxTextEncode"]
    cond = call_node(encode, text_encoders=text_encoders, prompt="make it night")[0]
    return {"model": model, "vae": vae, "text_encoders": text_encoders, "conditioning": cond, "call": call_node}


def _untrained_warnings(caplog):
    return [r for r in caplog.records if r.levelname == "WARNING" and "NOT trained" in r.getMessage()]


def test_untrained_widening_warns_on_every_run(widened_nodes, caplog):
    """The Loader's default (FLUX.1-Fill widened on the fly) returns the source: say so each run (issue 8)."""
    caplog.set_level("WARNING", logger="EditKit")
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(3))
    for run in (1, 2):
        _edit(widened_nodes, image=image, seed=run, steps=1)
        assert len(_untrained_warnings(caplog)) == run
    assert "returns the source picture" in _untrained_warnings(caplog)[0].getMessage()
    multi = editkit.NODE_CLASS_MAPPINGS["EditKitKontextInpaintMultiRound"]
    widened_nodes["call"](multi, model=widened_nodes["model"], vae=widened_nodes["vae"],
                          text_encoders=widened_nodes["text_encoders"], image=image, instructions="a", steps=1)
    assert len(_untrained_warnings(caplog)) == 3
    loader = editkit.NODE_CLASS_MAPPINGS["EditKitKontextInpaintLoader"]
    tooltip = loader.INPUT_TYPES()["required"]["transformer_file"][1]["tooltip"]
    assert "untrained" in tooltip and "return the source picture" in tooltip
    assert "RETURNS THE SOURCE" in loader.DESCRIPTION


def test_trained_model_gives_no_untrained_warning(kontext_nodes, caplog):
    caplog.set_level("WARNING", logger="EditKit")
    _edit(kontext_nodes, image=torch.rand(1, 64, 96, 3))
    assert _untrained_warnings(caplog) == []


def test_load_image_empty_mask_is_refused_with_a_paint_a_mask_error(kontext_nodes):
    image = torch.rand(1, 64, 96, 3)
    with pytest.raises(EditKitError, match="(?i)paint a mask or load a picture with transparency"):
        _edit(kontext_nodes, image=image, mask=torch.zeros(1, 64, 64))
    with pytest.raises(EditKitError, match="(?i)paint a mask"):
        _edit(kontext_nodes, source_latent={"samples": torch.zeros(1, 16, 16, 16)}, mask=torch.zeros(1, 64, 64))
