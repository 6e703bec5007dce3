"""The tiny-model declarations (tests/tiny) against the loaders: every single file a family's loader reads gives
back exactly the weights of the part it was written from.

Each file's ``keys`` is the inverse of the family's single-file reader; this checks that for every declared file
whose part names the family's ``ComponentSpec`` (so a new family's files are checked as soon as it is declared).
Weights are rounded to what each format holds, so safetensors files (bf16, fp8 plain / scaled / mixed) must give
the very same numbers; GGUF Q8_0 must agree to its rounding.
"""

from __future__ import annotations

import pytest
import torch

from editkit.pipelines.core.gguf import dequantize_parameter
from tiny import FAMILIES
from tiny.core import declaration

F32 = torch.float32
CASES = [pytest.param(module.FAMILY, role, id=f"{module.FAMILY.name}-{role}")
         for module, _ in FAMILIES for role, file in module.FAMILY.files.items()
         if module.FAMILY.declared and module.FAMILY.parts[file.part].model in ("transformer", "vae")]


def test_every_family_declares_files_its_loaders_read():
    assert {family.name for family, _role in (case.values for case in CASES)} == {
        "flux1", "zimage", "flux2", "qwen_image", "qwen_layered"}


@pytest.mark.parametrize(("family", "role"), CASES)
def test_file_loads_back_the_weights_it_was_written_from(family, role, tmp_path_factory):
    tree = family.tree(tmp_path_factory.mktemp(family.name))
    file = family.files[role]
    spec = getattr(declaration(family.declared), family.parts[file.part].model)
    module = spec.source(None, tree["paths"][role], F32).get().module
    loaded = module.state_dict()
    for name, layer in module.named_modules():  # fp8 kept as stored: weight = stored x scale
        if getattr(layer, "weight_scale", None) is not None:
            loaded[f"{name}.weight"] = loaded[f"{name}.weight"].float() * layer.weight_scale
    expected = tree["components"][file.part].state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        got = dequantize_parameter(loaded[key]) if hasattr(loaded[key], "quant_shape") else loaded[key].float()
        if file.path.endswith(".gguf"):  # Q8_0 rounds to 1/127 of a 32-block's peak (kept quantized or not)
            assert torch.allclose(got, value.float(), atol=float(value.abs().max()) / 100 + 1e-6), key
        else:
            assert torch.equal(got, value.float()), key


def test_gguf_writer_stores_given_blocks_in_the_types_own_block_size(tmp_path):
    """``write_gguf(pack=...)`` writes blocks gguf-py cannot quantize (K-quants: the GGUF benchmark's files) as the
    type's 256-weight blocks, byte for byte, and keeps as F32 what does not split into them."""
    import gguf
    import numpy as np

    from tiny.core import write_gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K]
    rng = np.random.default_rng(0)
    packed = {}

    def pack(array):
        packed[array.shape] = rng.integers(0, 256, (array.shape[0], array.shape[1] // block * size), dtype=np.uint8)
        return packed[array.shape]

    sd = {"k.weight": torch.randn(3, 2 * block), "short.weight": torch.randn(2, 64), "b.bias": torch.randn(5)}
    write_gguf(sd, tmp_path / "k.gguf", "Q4_K", pack=pack)
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors}
    assert tensors["k.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
    assert list(tensors["k.weight"].shape) == [2 * block, 3]  # GGUF lists the innermost dimension first
    assert np.array_equal(np.asarray(tensors["k.weight"].data).reshape(3, -1), packed[(3, 2 * block)])
    assert list(packed) == [(3, 2 * block)]  # 64 columns are not a whole 256-block: not packed
    for name in ("short.weight", "b.bias"):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(tensors[name].data).reshape(sd[name].shape), sd[name].numpy())
