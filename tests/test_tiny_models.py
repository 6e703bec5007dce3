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
