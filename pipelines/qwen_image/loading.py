"""Loading Qwen-Image-Edit offline: the diffusers folder or ComfyUI's single files.

Sources (the ones ComfyUI users have):

* the diffusers folder ``models/diffusers/Qwen-Image-Edit-2509``: every component;
* the transformer from one file in ``models/diffusion_models``: ComfyUI's ``.safetensors``
  (keys as diffusers' with a ``model.diffusion_model.`` prefix, bf16 or fp8-stored) or a ``.gguf``
  (Q8_0 and every other type diffusers reads; the weights stay quantized in memory);
* the VAE from ``qwen_image_vae.safetensors`` in ``models/vae`` (ComfyUI's Wan-VAE key layout,
  converted with diffusers' own Wan converter) or a diffusers-layout file;
* the Qwen2.5-VL text encoder: see :mod:`.text`.

Qwen-Image, Qwen-Image-Edit, -2509 and -2511 share one architecture and one set of weight names.
Qwen-Image-Edit-2511 differs in one switch, diffusers' ``zero_cond_t``: the reference pictures'
tokens are modulated with the embedding of timestep 0 (a second modulation, selected per token),
while the output tokens get the step's timestep. Its weights are otherwise 2509-shaped, so loading
a 2511 file as 2509 runs without error and silently gives other pictures. The 2511 files say what
they are: the diffusers folder's ``transformer/config.json`` sets ``zero_cond_t``, and ComfyUI's
single files (bf16, fp8mixed, and GGUFs converted from them) carry an empty marker tensor
``__index_timestep_zero__`` (ComfyUI reads it to pick its ``index_timestep_zero`` reference
method). Those are read first; only when the weights say nothing does the folder's
``model_index.json``, the file's metadata (GGUF ``general.name``, safetensors header) or its name
decide ("2511" there still selects 2511: GGUF converters may drop the empty marker). The loader's
``variant`` widget overrides all of it. Single files load with the configs in ``configs/``; sizes
that tensor shapes reveal are read from the file. Loaded models are shared through the weak cache
of :mod:`..core.loading`, exactly like the Flux loaders.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch

from ..core import loading as core_loading
from ..core.diffusers_compat import convert_wan_vae_to_diffusers
from ..core.errors import EditKitError, ModelFileError
from ..core.family import ComponentSpec
from ..core.loading import LazyModel
from ..core.runtime import Component
from ..core.single_file import SingleFile, check_rotary

log = logging.getLogger("EditKit")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

TRANSFORMER_EXPECTED = (
    "a Qwen-Image-Edit-2509 or -2511 transformer (ComfyUI's qwen_image_edit_2509_bf16.safetensors, "
    "qwen_image_edit_2509_fp8_e4m3fn.safetensors, qwen_image_edit_2511_bf16.safetensors or "
    "qwen_image_edit_2511_fp8mixed.safetensors, or a .gguf such as qwen-image-edit-2511-Q8_0.gguf)"
)
VAE_EXPECTED = "the Qwen-Image VAE (qwen_image_vae.safetensors, 16 latent channels)"

# Variants: what the weights are (see the module docstring for how each is recognised).
EDIT_2509 = "Qwen-Image-Edit-2509"
EDIT_2511 = "Qwen-Image-Edit-2511"  # 2509's pipeline and template; the transformer runs with zero_cond_t
EDIT = "Qwen-Image-Edit"
TEXT_TO_IMAGE = "Qwen-Image"
LAYERED = "Qwen-Image-Layered"  # picture -> RGBA layers: its own loader and node
VARIANTS = (EDIT_2509, EDIT_2511, EDIT)
PLUS_VARIANTS = (EDIT_2509, EDIT_2511)  # QwenImageEditPlusPipeline: any number of pictures, "Picture N:" template
ZERO_COND_MARKER = "__index_timestep_zero__"  # the empty tensor ComfyUI's 2511 files carry (with its key prefix)
EDIT_PIPELINES = ("QwenImageEditPlusPipeline", "QwenImageEditPipeline")  # model_index.json classes of edit models


_load_json = core_loading.read_json
count_blocks = core_loading.count_blocks


# --------------------------------------------------------------------------------------
# Variant detection


def variant_from_text(text: str) -> str | None:
    """The variant a model name or title names, or None when it names none."""
    t = re.sub(r"[\s\-.]+", "_", text.lower())
    if "layered" in t:
        return LAYERED
    if "edit" in t:
        if "2511" in t:
            return EDIT_2511
        return EDIT_2509 if re.search(r"2509|plus", t) else EDIT
    if "qwen_image" in t or "qwenimage" in t:
        return TEXT_TO_IMAGE
    return None


def folder_zero_cond_t(folder: Path) -> bool:
    """Whether the folder's transformer config sets ``zero_cond_t`` (Qwen-Image-Edit-2511's switch)."""
    config = folder / "transformer" / "config.json"
    return config.is_file() and bool(_load_json(config).get("zero_cond_t", False))


def file_has_zero_cond_marker(path: Path) -> bool:
    """Whether a weight file carries ComfyUI's ``__index_timestep_zero__`` marker (any key prefix).

    Reads only the header: safetensors' key list, or GGUF's tensor table (the file is mapped, not read).
    """
    try:
        if path.suffix.lower() == ".gguf":
            import gguf

            names = [tensor.name for tensor in gguf.GGUFReader(str(path)).tensors]
        else:
            import safetensors

            with safetensors.safe_open(str(path), "pt") as handle:
                names = list(handle.keys())
    except Exception as exc:  # unreadable headers are reported by the real load
        log.debug("EditKit: cannot list the tensors of %s (%s)", path.name, exc)
        return False
    return any(name == ZERO_COND_MARKER or name.endswith("." + ZERO_COND_MARKER) for name in names)


def variant_from_folder(folder: Path) -> str | None:
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    name = _load_json(index).get("_class_name", "")
    if name.startswith("QwenImageEditPlus"):
        return EDIT_2511 if folder_zero_cond_t(folder) else EDIT_2509
    if name.startswith("QwenImageEdit"):
        return EDIT
    if name.startswith("QwenImageLayered"):
        return LAYERED
    if name.startswith("QwenImage"):
        return TEXT_TO_IMAGE
    return None


def _file_titles(path: Path) -> list[str]:
    """Names a weight file gives itself: GGUF ``general.*`` names, safetensors header metadata."""
    titles: list[str] = []
    try:
        if path.suffix.lower() == ".gguf":
            import gguf

            reader = gguf.GGUFReader(str(path))
            for key in ("general.name", "general.basename", "general.finetune"):
                found = reader.get_field(key)
                if found is not None:
                    titles.append(bytes(found.parts[found.data[0]]).decode("utf-8", "replace"))
        elif path.suffix.lower() in (".safetensors", ".sft"):
            import safetensors

            with safetensors.safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
            titles += [v for k, v in meta.items() if re.search(r"title|name|model", k, re.I) and isinstance(v, str)]
    except Exception as exc:  # unreadable headers are reported by the real load
        log.debug("EditKit: no metadata from %s (%s)", path.name, exc)
    return titles


def detect_variant(folder: Path | None, file: Path | None) -> tuple[str | None, str]:
    """``(variant or None, where it was read)`` for a transformer file or folder: the weights first, then names."""
    if file is not None:
        if file_has_zero_cond_marker(file):
            return EDIT_2511, f"the file's {ZERO_COND_MARKER} tensor"
        for title in _file_titles(file):
            found = variant_from_text(title)
            if found:
                return found, f"the file's metadata ('{title}')"
        found = variant_from_text(file.name)
        if found:
            return found, f"the file name '{file.name}'"
        return None, f"the file '{file.name}'"
    if folder is not None:
        if folder_zero_cond_t(folder):
            return EDIT_2511, f"{folder.name}/transformer/config.json (zero_cond_t)"
        found = variant_from_folder(folder)
        if found:
            return found, f"{folder.name}/model_index.json"
        found = variant_from_text(folder.name)
        return found, f"the folder name '{folder.name}'"
    return None, "nothing"


def resolve_variant(requested: str, folder: Path | None, file: Path | None) -> str:
    """The variant to run: the widget's choice, else the detected one; refuses text-to-image Qwen-Image."""
    if requested in VARIANTS:
        return requested
    found, source = detect_variant(folder, file)
    if found == TEXT_TO_IMAGE:
        raise EditKitError(
            f"This is Qwen-Image (the text-to-image model), found from {source}, not an edit model. Load "
            "Qwen-Image-Edit-2509 or -2511 (qwen_image_edit_25xx_*.safetensors or their diffusers folder). "
            "If the file really is an Edit model with another name, set 'variant' in EditKit · Qwen-Image Loader."
        )
    if found == LAYERED:
        raise EditKitError(
            f"This is Qwen-Image-Layered (it splits a picture into transparent layers), found from {source}, not an "
            "edit model: load it with EditKit · Qwen-Image-Layered Loader. Here, load Qwen-Image-Edit-2509 or -2511 "
            "(qwen_image_edit_25xx_*.safetensors or their diffusers folder)."
        )
    if found is None:
        log.info("EditKit: %s does not say which Qwen-Image model it is; assuming %s (set 'variant' in EditKit · "
                 "Qwen-Image Loader if it is %s).", source, EDIT_2509, EDIT_2511)
        return EDIT_2509
    if found == EDIT:
        log.info("EditKit: %s is the original Qwen-Image-Edit (found from %s); using its one-picture template.",
                 file.name if file else folder.name, source)
    return found


def wants_zero_cond_t(requested: str, folder: Path | None, file: Path | None) -> bool:
    """Whether the transformer must run with ``zero_cond_t``: the widget's variant, else what was detected.

    Unlike :func:`resolve_variant` this never refuses a model (the sampler node does, with its message).
    """
    if requested in VARIANTS:
        return requested == EDIT_2511
    return detect_variant(folder, file)[0] == EDIT_2511


# --------------------------------------------------------------------------------------
# Transformer


def strip_comfy_prefix(sd: dict) -> dict:
    for prefix in COMFY_PREFIXES:
        if any(k.startswith(prefix + "img_in.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _shape(tensor) -> tuple[int, ...]:
    """Logical shape, also for GGUF tensors (stored as packed bytes)."""
    quant = getattr(tensor, "quant_type", None)
    if quant is None:
        return tuple(tensor.shape)
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[quant]
    return (*tensor.shape[:-1], tensor.shape[-1] // type_size * block)


def _describe_foreign(sd: dict) -> str:
    keys = set(sd)
    if any(k.startswith(("double_blocks.", "single_blocks.", "single_transformer_blocks.")) for k in keys) or \
            any(".double_blocks." in k for k in keys):
        return "a FLUX.1 transformer (use EditKit · Flux Loader for it)"
    if any("layers.0.adaLN_modulation" in k or k.startswith("cap_embedder") for k in keys):
        return "a Z-Image / Lumina transformer"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "a VAE"
    sample = ", ".join(list(sd)[:3]) or "no tensors"
    return f"not a Qwen-Image transformer (found keys like {sample})"


def transformer_config_from_state_dict(sd: dict) -> dict:
    """QwenImageTransformer2DModel settings a (diffusers-key) state dict determines."""
    width, in_channels = _shape(sd["img_in.weight"])
    head_dim = _shape(sd["transformer_blocks.0.attn.norm_q.weight"])[0]
    check_rotary(CONFIG_DIR / "transformer", "axes_dims_rope", head_dim, "Qwen-Image transformer")
    return {
        "in_channels": in_channels,
        "out_channels": _shape(sd["proj_out.weight"])[0] // 4,
        "num_layers": count_blocks(sd, "transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": _shape(sd["txt_in.weight"])[1],
    }


def _recognise(sd: dict, path: Path) -> tuple[dict, str]:
    sd = strip_comfy_prefix(sd)
    if "img_in.weight" not in sd or "txt_norm.weight" not in sd:
        raise ModelFileError(path, f"This is {_describe_foreign(sd)}", TRANSFORMER_EXPECTED)
    sd.pop(ZERO_COND_MARKER, None)  # a flag, not a weight (read by detect_variant)
    return sd, "diffusers"


# Qwen-Image, -Edit, -2509 and -2511 files (ComfyUI's keys are diffusers' with a prefix). ComfyUI's fp8 files,
# scaled fp8 and Comfy-Org's fp8mixed (2511's fp8 release: a float32 ``weight_scale`` per fp8 layer) keep their
# fp8 weights; ``zero_cond_t`` (Qwen-Image-Edit-2511) adds no weights: the same tensors load either way.
SINGLE_FILE = SingleFile(
    model_class="QwenImageTransformer2DModel", config_dir=CONFIG_DIR / "transformer", name="Qwen-Image transformer",
    expected=TRANSFORMER_EXPECTED, recognise=_recognise, config_from=transformer_config_from_state_dict,
)


def _transformer_from_file(path: Path, dtype: torch.dtype, storage: torch.dtype | None, zero_cond_t: bool
                           ) -> Component:
    return SINGLE_FILE.with_options(zero_cond_t=zero_cond_t).load(path, dtype, storage)


def _log_variant(component: Component, source: str) -> Component:
    if component.module.config.zero_cond_t:
        log.info("EditKit: %s is %s (%s): the reference pictures' tokens run at timestep 0 (zero_cond_t).",
                 component.name, EDIT_2511, source)
    return component


def _transformer_from_detected_file(path: Path, dtype: torch.dtype, storage: torch.dtype | None = None) -> Component:
    """A single file with ``zero_cond_t`` as its weights (then its name) say."""
    zero = wants_zero_cond_t("auto", None, path)
    return _log_variant(_transformer_from_file(path, dtype, storage, zero), detect_variant(None, path)[1])


def _log_folder_variant(module, sub: Path) -> None:
    if module.config.zero_cond_t:
        log.info("EditKit: %s is %s (its config sets zero_cond_t): the reference pictures' tokens run at timestep 0.",
                 f"{sub.parent.name}/{sub.name}", EDIT_2511)


TRANSFORMER = ComponentSpec(
    tag="qwen_transformer", what="Qwen-Image transformer", subfolder="transformer",
    model_class="QwenImageTransformer2DModel", kind="diffusion", from_file=_transformer_from_detected_file,
    casts=True, check_module=_log_folder_variant,
    missing="No transformer: pick the Qwen-Image-Edit-2509 or -2511 diffusers folder or a transformer file in "
            "EditKit · Qwen-Image Loader.",
)


def _forced(variant: str) -> ComponentSpec:
    """The transformer as the loader's ``variant`` widget says, whatever the weights say (cached apart)."""
    zero = variant == EDIT_2511

    def from_file(path: Path, dtype: torch.dtype, storage: torch.dtype | None = None) -> Component:
        return _log_variant(_transformer_from_file(path, dtype, storage, zero), "the loader's variant setting")

    return dataclasses.replace(TRANSFORMER, tag=f"qwen_transformer:{variant}", from_file=from_file,
                               config_overrides=(("zero_cond_t", zero),))


def transformer_source(folder: Path | None, file: Path | None, dtype: torch.dtype,
                       storage: torch.dtype | None = None, variant: str = "auto") -> LazyModel:
    """A lazily loaded transformer: ``file`` if given, else the folder's ``transformer``.

    ``dtype`` is the compute dtype; dense weights are stored in ``storage`` (default: ``dtype``) and cast
    layer by layer (core.precision), as the Flux loader does. ``variant`` is the loader's widget: "auto"
    reads the variant from the weights (then names) when the model is first used; Qwen-Image-Edit-2511,
    chosen or found, loads with ``zero_cond_t``.
    """
    spec = _forced(variant) if variant in VARIANTS else TRANSFORMER
    return spec.source(folder, file, dtype, storage)


# --------------------------------------------------------------------------------------
# VAE


def wan_vae_layout(sd: dict) -> str | None:
    """``"wan"`` (ComfyUI's / Wan 2.1's keys), ``"diffusers"``, ``"2d"`` (a FLUX.1 / SD VAE) or None (no VAE)."""
    if "encoder.conv1.weight" in sd:
        return "wan"
    if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
        return None
    return "diffusers" if any(k.endswith(".gamma") for k in sd) else "2d"  # Wan's RMS norms have 'gamma' weights


def wan_vae_config(sd: dict) -> dict:
    """AutoencoderKLQwenImage settings a diffusers-key state dict determines (width, latent and image channels)."""
    return {"base_dim": int(sd["encoder.conv_in.weight"].shape[0]), "z_dim": int(sd["decoder.conv_in.weight"].shape[1]),
            "input_channels": int(sd["encoder.conv_in.weight"].shape[1])}


def check_latent(config: dict, path: Path, model: str, expected: str) -> None:
    if config["z_dim"] != 16:
        raise ModelFileError(path, f"A VAE with {config['z_dim']} latent channels ({model} has 16)", expected)


def _check_rgb(config: dict, path: Path) -> None:
    if config["input_channels"] != 3:
        raise ModelFileError(path, f"A VAE with {config['input_channels']} image channels (Qwen-Image's has 3; "
                                   "Qwen-Image-Layered's RGBA VAE has 4: load it with EditKit · Qwen-Image-Layered "
                                   "Loader)", VAE_EXPECTED)
    check_latent(config, path, "Qwen-Image", VAE_EXPECTED)


# qwen_image_vae.safetensors: ComfyUI's Wan-2.1 keys, converted by diffusers' Wan converter, or diffusers'. The
# Layered loader declares its RGBA VAE from this one (``layered_loading.VAE_FILE``).
VAE_FILE = SingleFile(
    model_class="AutoencoderKLQwenImage", config_dir=CONFIG_DIR / "vae", name="Qwen-Image VAE", expected=VAE_EXPECTED,
    kind="vae", prefixes=("first_stage_model.",), layout=wan_vae_layout, unknown="Not a VAE",
    foreign=(("2d", "This is a 2-D image VAE (FLUX.1 / SD style), not Qwen-Image's"),),
    to_diffusers=convert_wan_vae_to_diffusers, config_from=wan_vae_config, check=_check_rgb,
)


VAE = ComponentSpec(
    tag="qwen_vae", what="Qwen-Image VAE", subfolder="vae", model_class="AutoencoderKLQwenImage", kind="vae",
    single_file=VAE_FILE,
    missing="No VAE: pick the Qwen-Image-Edit-2509 diffusers folder or qwen_image_vae.safetensors in EditKit · "
            "Qwen-Image Loader.",
)
vae_source = VAE.source


# --------------------------------------------------------------------------------------
# Scheduler and the model handle



def lightning_scheduler_config() -> dict:
    """The schedule the Qwen-Image-Lightning LoRAs were distilled for (shift ln 3, no terminal stretch)."""
    return _load_json(CONFIG_DIR / "scheduler_lightning" / "scheduler_config.json")


class QwenImageModel:
    """What EditKit's Qwen-Image loader hands to the edit node: a lazily loaded transformer + how to run it.

    ``transformer`` is a lazy handle (a :class:`..core.lora.LoraModelSource` once a LoRA node added
    LoRAs). ``variant`` (which prompt template) is resolved when first asked, so a loader output nobody
    uses never fails. ``schedule`` is the scheduler config to sample with: the model's own, or the one
    the Lightning LoRAs were distilled for when a LoRA named "...Lightning..." is applied.
    """

    def __init__(self, transformer, scheduler_config: dict, requested_variant: str = "auto",
                 folder: Path | None = None, file: Path | None = None):
        self.transformer = transformer
        self.scheduler_config = scheduler_config
        self.requested_variant = requested_variant
        self.folder = folder
        self.file = file

    @property
    def variant(self) -> str:
        return resolve_variant(self.requested_variant, self.folder, self.file)

    @property
    def lora_names(self) -> list[str]:
        return [weights.name for weights, strength in getattr(self.transformer, "loras", ()) if strength != 0.0]

    @property
    def schedule(self) -> dict:
        lightning = [name for name in self.lora_names if "lightning" in name.lower()]
        if lightning:
            log.info("EditKit: %s is a Lightning LoRA; sampling with its schedule (shift ln 3, no terminal stretch).",
                     lightning[0])
            return lightning_scheduler_config()
        return self.scheduler_config

    def describe(self) -> str:
        """Which variant this model runs as and why, e.g. for the loader's log and the model's repr."""
        if self.requested_variant in VARIANTS:
            return f"{self.requested_variant} (set in the loader)"
        found, source = detect_variant(self.folder, self.file)
        return f"{found or EDIT_2509 + ' (assumed)'}, from {source}"

    def __repr__(self) -> str:
        return f"<EditKit QwenImageModel {self.describe()}: {self.transformer!r}>"
