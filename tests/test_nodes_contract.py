"""Every EditKit node follows ComfyUI's V1 contract and the pack's conventions."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import editkit
from packload import ROOT

NODES = sorted(editkit.NODE_CLASS_MAPPINGS.items())
COMFY_IMPORT = re.compile(r"^\s*(import|from)\s+(comfy|comfy_extras|comfy_execution|folder_paths|latent_preview|server|execution)\b")
SOCKET_TYPES_WITHOUT_WIDGET = {"IMAGE", "MASK", "LATENT", "CONDITIONING"}
TEXT_OUTPUTS = {"STRING"}  # ComfyUI's text type: shown by a text display node (the Qwen loader's 'variant')


def test_pack_exports_nodes():
    assert {"EditKitFluxLoader", "EditKitFluxTextEncode", "EditKitFluxFillInpaint", "EditKitFluxFillOutpaint"} <= set(
        editkit.NODE_CLASS_MAPPINGS
    )
    assert set(editkit.NODE_DISPLAY_NAME_MAPPINGS) == set(editkit.NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("name, cls", NODES)
def test_node_contract(name, cls, models_root):
    assert name.startswith("EditKit") and name == cls.__name__
    assert editkit.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("EditKit · ")
    assert cls.CATEGORY.startswith("EditKit/")
    assert len(cls.DESCRIPTION) > 40
    assert callable(getattr(cls(), cls.FUNCTION))
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for input_name, value in spec.get(section, {}).items():
            options = value[1] if len(value) > 1 else {}
            assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
            kind = value[0]
            if isinstance(kind, list) and kind:
                assert options.get("default", kind[0]) in kind, f"{name}.{input_name} default not in its list"
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], f"{name}.{input_name} default range"
    for type_name in cls.RETURN_TYPES:
        assert type_name in SOCKET_TYPES_WITHOUT_WIDGET | TEXT_OUTPUTS or type_name.startswith("EDITKIT_")


def test_pack_imports_without_comfyui():
    """A fresh interpreter with no ComfyUI on the path imports the pack and finds its nodes."""
    code = (
        "import sys; sys.path.insert(0, 'scripts'); from packload import load_pack; "
        "pack = load_pack(); import editkit.nodes.comfy_bridge as b; "
        "assert not b.HAVE_COMFY and 'comfy' not in sys.modules; print(len(pack.NODE_CLASS_MAPPINGS))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) == len(NODES)


def test_only_the_bridge_imports_comfyui():
    offenders = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        # Hidden folders are not the pack: .venv, .git, and CI's ComfyUI copy in .cache/.
        if parts[0] in ("tests", "scripts") or any(p.startswith(".") for p in parts) or path.name == "comfy_bridge.py":
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if COMFY_IMPORT.match(line):
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders


def test_pipelines_never_import_nodes():
    for path in (ROOT / "pipelines").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "from ..nodes" not in text and "from ...nodes" not in text and "import nodes" not in text, path


@pytest.mark.parametrize("name, inputs", [
    ("EditKitFluxLoader", {"diffusers_folder": "(none)", "transformer_file": "flux1-fill-dev.safetensors",
                           "vae_file": "ae.safetensors", "clip_l_file": "(from folder)", "t5_file": "(from folder)"}),
    ("EditKitKontextInpaintLoader", {"diffusers_folder": "FLUX.1-Fill-dev", "transformer_file": "(from folder)",
                                     "vae_file": "(from folder)", "clip_l_file": "(from folder)",
                                     "t5_file": "(from folder)", "widen_init": "zeros"}),
    ("EditKitBEN2Loader", {"model_name": "BEN2_Base.safetensors", "precision": "auto"}),
])
def test_loaders_notice_replaced_files(name, inputs, models_root, tmp_path):
    """IS_CHANGED follows the selected files, so a checkpoint replaced under the same name reloads."""
    import os

    cls = editkit.NODE_CLASS_MAPPINGS[name]
    before = cls.IS_CHANGED(**inputs)
    assert before and before == cls.IS_CHANGED(**inputs)
    target = {"EditKitFluxLoader": models_root / "vae" / "ae.safetensors",
              "EditKitKontextInpaintLoader": models_root / "diffusers" / "FLUX.1-Fill-dev" / "vae" / "config.json",
              "EditKitBEN2Loader": models_root / "background_removal" / "BEN2_Base.safetensors"}[name]
    stat = target.stat()
    try:
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert cls.IS_CHANGED(**inputs) != before
    finally:
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_dtype_policy(monkeypatch):
    """bf16 where supported; fp16 only for the transformer and encoders on GPUs without bf16; the
    FLUX.1 VAE never fp16 (it overflows to black pictures); fp32 on the CPU."""
    from editkit.nodes import comfy_bridge as bridge

    assert bridge.default_dtype("diffusion") == torch.float32  # this machine: no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert bridge.default_dtype("diffusion") == torch.float16
    assert bridge.default_dtype("vae") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert {bridge.default_dtype(k) for k in ("diffusion", "vae", "text_encoder")} == {torch.bfloat16}

    # Inside ComfyUI its flags and per-device rules decide (unet_dtype, unet_manual_cast, text_encoder_dtype,
    # vae_dtype): tested against ComfyUI's real model management in
    # test_comfy_bridge.py::test_precision_flags_decide_auto_dtypes.
