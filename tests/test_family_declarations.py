"""Every family's declaration (pipelines/families.py, core.family.Family) against what it names.

The declaration is what the loader nodes, LoRA nodes, samplers' LATENT boundary and the tiny-model generator read,
so a wrong entry here is a wrong model, schedule or preview for users: each is checked against an independent
source (diffusers' classes, the shipped and a folder's scheduler files, ComfyUI's latent formats, the tiny models'
VAEs, the node classes registered with ComfyUI).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from editkit.pipelines import families
from editkit.pipelines.core.family import ComponentSpec, Family
from editkit.pipelines.core.lora import LoraFamily
from editkit.pipelines.core.runtime import Component

NAMES = families.names()
PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def test_every_family_folder_is_registered():
    """A family module declaring a Family that the registry does not list would be invisible to shared code."""
    declared = set()
    for path in PIPELINES.glob("*/family.py"):
        module = __import__(f"editkit.pipelines.{path.parent.name}.family", fromlist=["*"])
        declared |= {id(value) for value in vars(module).values() if isinstance(value, Family)}
    assert declared == {id(families.family(name)) for name in NAMES}
    assert len(NAMES) >= 5


@pytest.mark.parametrize("name", NAMES)
def test_components_name_real_classes(name):
    import diffusers

    family = families.family(name)
    for spec, kind in ((family.transformer, "diffusion"), (family.vae, "vae")):
        assert isinstance(spec, ComponentSpec)
        assert spec.kind == kind
        assert issubclass(getattr(diffusers, spec.model_class), torch.nn.Module)
    assert family.lora is None or isinstance(family.lora, LoraFamily)
    assert family.pipelines == () or all(hasattr(diffusers, p) or p.startswith("Flux2Klein") for p in family.pipelines)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_scheduler_is_a_flow_match_schedule(name):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = families.family(name).scheduler_config(None)
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(4, mu=0.5 if config.get("use_dynamic_shifting") else None)
    assert len(scheduler.timesteps) == 4


@pytest.mark.parametrize("name", NAMES)
def test_a_folders_scheduler_replaces_the_shipped_one(name, tmp_path):
    family = families.family(name)
    own = {**family.scheduler_config(None), "shift": 7.25}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(own))
    assert family.scheduler_config(tmp_path) == own
    assert family.scheduler_config(tmp_path / "elsewhere")["shift"] != 7.25


@pytest.mark.parametrize("name", NAMES)
def test_transformer_options_only_where_the_family_takes_them(name):
    family = families.family(name)
    if family.transformer_source is None:
        with pytest.raises(TypeError, match="takes no options"):
            family.transformer_from(None, None, torch.float32, variant="auto")
    else:
        family.transformer_from(None, None, torch.float32, variant="auto")  # unavailable until used, no error


@functools.cache
def _tiny_vae(name: str):
    from tiny import flux1, flux2, qwen_image, qwen_layered, zimage

    tiny = {"flux": flux1, "flux2": flux2, "qwen_image": qwen_image, "qwen_layered": qwen_layered,
            "zimage": zimage}[name].FAMILY
    return tiny.build("vae")


@pytest.mark.parametrize("name", NAMES)
def test_latent_format_fits_the_families_vae(name):
    """The LATENT boundary converts what the VAE's encoder produces: the format's channel count must be what the
    family's sampler sees of that VAE's latents (patchified for FLUX.2), and model ↔ raw must round-trip."""
    family = families.family(name)
    vae = _tiny_vae(name)
    fmt = family.latent_format(Component(vae, "vae", "tiny", torch.float32))
    channels = getattr(vae.config, "latent_channels", None) or vae.config.z_dim
    assert fmt.channels in (channels, channels * 4)  # FLUX.2 samples 2x2-patchified latents
    raw = torch.randn(1, fmt.channels, 3, 5) * 3 + 1
    assert torch.allclose(fmt.to_raw(fmt.to_model(raw)), raw, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_preview_names_comfyuis_format_with_the_same_channels(name, comfy_latent_formats):
    fmt = families.family(name).latent_format(Component(_tiny_vae(name), "vae", "tiny", torch.float32))
    comfy = getattr(comfy_latent_formats, fmt.preview, None)
    if comfy is None:
        pytest.skip(f"ComfyUI 0.3.64 has no latent_formats.{fmt.preview} (newer ComfyUI: previews)")
    assert comfy.latent_channels == fmt.channels


@pytest.fixture(scope="module")
def comfy_latent_formats():
    """ComfyUI's own ``comfy/latent_formats.py`` (it imports only torch), read from ``COMFYUI_ROOT``."""
    import importlib.util
    import os

    path = Path(os.environ.get("COMFYUI_ROOT", "/nonexistent")) / "comfy" / "latent_formats.py"
    if not path.is_file():
        pytest.skip("ComfyUI's source not found (set COMFYUI_ROOT)")
    spec = importlib.util.spec_from_file_location("comfy_latent_formats_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", [n for n in NAMES if families.family(n).lora is not None])
def test_each_lora_node_reads_its_familys_rules(name):
    """The LoRA node of a family converts keys with that family's rules (not another family's)."""
    import editkit

    family = families.family(name)
    nodes = [cls for cls in editkit.NODE_CLASS_MAPPINGS.values() if getattr(cls, "LORA_FAMILY", None) is family.lora]
    assert len(nodes) == 1, f"{family.name}: LoRA nodes {nodes}"
