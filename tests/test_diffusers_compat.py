"""Each diffusers private helper EditKit uses exists in the installed diffusers and behaves as EditKit expects."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from editkit.pipelines.core import diffusers_compat as compat
from editkit.pipelines.core.errors import EditKitError


@pytest.mark.parametrize("name", sorted(compat.PRIVATE_HELPERS))
def test_helper_resolves(name):
    assert callable(compat.helper(name))


def test_flux_converter_maps_bfl_keys(tiny_models):
    """Through EditKit's layout module, which splits the narrow single-block linear1 itself first."""
    from safetensors.torch import load_file

    from editkit.pipelines.flux import layout

    bfl = load_file(str(tiny_models / "diffusion_models" / "flux1-dev.safetensors"))
    converted = layout.bfl_transformer_to_diffusers(dict(bfl))
    assert "x_embedder.weight" in converted and "transformer_blocks.0.attn.to_q.weight" in converted
    assert not any(k.startswith("double_blocks.") for k in converted)


def test_flux2_converter_maps_bfl_keys():
    """FLUX.2's BFL layout (what ComfyUI's klein files hold) → diffusers' keys, fused qkv split in three."""
    from tiny.flux2 import FAMILY, diffusers_to_bfl

    original = FAMILY.build("transformer").state_dict()
    bfl = diffusers_to_bfl(dict(original))
    assert "double_blocks.0.img_attn.qkv.weight" in bfl
    converted = compat.convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert "x_embedder.weight" in converted and "transformer_blocks.0.attn.to_q.weight" in converted
    assert not any(k.startswith("double_blocks.") for k in converted)
    assert set(converted) == set(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)


def test_ldm_vae_converter_maps_bfl_vae_keys():
    """BFL's ae.safetensors keys back to diffusers' AutoencoderKL, every tensor (attention 1x1 convs as Linear)."""
    from tiny import flux1

    vae = flux1.FAMILY.build("vae").state_dict()
    bfl = flux1.bfl_vae(vae)
    config = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    converted = compat.convert_ldm_vae_checkpoint(bfl, config)
    assert converted.keys() == vae.keys()
    assert all(torch.equal(converted[k], vae[k]) for k in vae)


def test_gguf_reader_and_dequantizer_round_trip(tiny_models):
    from safetensors.torch import load_file

    dense = load_file(str(tiny_models / "diffusion_models" / "flux1-dev.safetensors"))
    quantized = compat.load_gguf_checkpoint(str(tiny_models / "diffusion_models" / "flux1-dev-Q8_0.gguf"))
    name = "img_in.weight"
    assert hasattr(quantized[name], "quant_type")
    back = compat.dequantize_gguf_tensor(quantized[name]).float()
    torch.testing.assert_close(back, dense[name].float(), atol=2e-2, rtol=0)


def test_missing_helper_names_itself(monkeypatch):
    monkeypatch.setitem(compat.PRIVATE_HELPERS, "gone", ("diffusers.loaders", "no_such_helper"))
    with pytest.raises(EditKitError, match=r"has no diffusers.loaders.no_such_helper.*\(gone\)"):
        compat.helper("gone")


def test_importing_the_pack_does_not_import_diffusers_or_transformers():
    """Issue: the pack must add little to ComfyUI's start; diffusers/transformers load when a node needs them."""
    code = (
        "import sys; sys.path.insert(0, 'scripts'); from packload import load_pack; load_pack(); "
        "print(sorted(m for m in ('diffusers', 'transformers', 'accelerate', 'gguf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=compat.__file__.rsplit("/pipelines/", 1)[0])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
