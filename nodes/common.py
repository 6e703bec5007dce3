"""Input specs and small conversions shared by EditKit's node modules.

Kept here so every sampler offers the same seed / steps / guidance / denoise / batch widgets
with the same ranges and tooltips.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipelines.core import compile as regional
from ..pipelines.core import integrity
from ..pipelines.core import sampling as core
from ..pipelines.core.errors import EditKitError
from ..pipelines.core.loading import file_key, stored_float_dtype
from ..pipelines.core.precision import HALF_TYPES, Precision
from ..pipelines.flux.conditioning import FluxText, read_conditioning
from . import comfy_bridge as bridge

log = logging.getLogger("EditKit")

NONE = "(none)"
FROM_FOLDER = "(from folder)"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


SEED_TOOLTIP = (
    "Random seed. The starting noise is drawn on the CPU from it, so a seed gives the same noise on every machine; "
    "pictures from different GPUs or settings agree closely but not bit for bit (their kernels differ)."
)


def seed_input(tooltip: str = SEED_TOOLTIP) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": tooltip})


def steps_input(default: int = 28) -> tuple:
    return ("INT", {"default": default, "min": 1, "max": 200,
                    "tooltip": "Number of sampling steps (transformer calls). More steps: finer detail, slower."})


def guidance_input(default: float = 30.0) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 100.0, "step": 0.5,
                      "tooltip": "FLUX.1 guidance embedding. FLUX.1-Fill-dev is tuned for 30. A 'guidance' set on "
                                 "the CONDITIONING (FluxGuidance) takes precedence over this value."})


def denoise_input() -> tuple:
    return ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                      "tooltip": "How much to change: 1.0 starts from pure noise; lower values start from the input "
                                 "image noised to that level (img2img). Steps stays the number of transformer calls."})


SAMPLER_TOOLTIP = (
    "euler: deterministic, as the reference pipelines. euler_ancestral: adds fresh noise every step (ComfyUI's "
    "rectified-flow form), drawn from the seed, so results stay reproducible."
)
CONVENTION_TOOLTIPS = {
    "denoise": "How denoise < 1 is read. denoise: ComfyUI KSampler's ('steps' model calls taken from the end of a "
               "schedule for steps / denoise steps). strength: diffusers img2img's (the last int(steps x denoise) "
               "steps of the 'steps' schedule, as diffusers' get_timesteps).",
    "strength": "How denoise < 1 is read. strength: diffusers' (the reference pipeline's 'strength': the last "
                "int(steps x denoise) steps of the schedule). denoise: ComfyUI KSampler's (steps = model calls).",
}


def sampler_input(tooltip: str = SAMPLER_TOOLTIP) -> tuple:
    """The ``sampler`` widget of every EditKit sampler (the shared core's samplers, euler first)."""
    return (list(core.SAMPLERS), {"default": "euler", "tooltip": tooltip})


def convention_input(default: str = "denoise") -> tuple:
    """The ``denoise_convention`` widget: how a partial denoise is read (pipelines/core/sampling.py)."""
    return (list(core.CONVENTIONS), {"default": default, "tooltip": CONVENTION_TOOLTIPS[default]})


def cfg_input(tooltip: str, default: float = 1.0) -> tuple:
    """A KSampler-style ``cfg`` widget (1.0 = off) for the families that run true classifier-free guidance."""
    return ("FLOAT", {"default": default, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": tooltip})


def partial_denoise_input(tooltip: str) -> tuple:
    """A ``denoise`` widget whose meaning a ``denoise_convention`` widget next to it decides."""
    return ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": tooltip})


class PromptPairEncode:
    """Base of the two-prompt Text Encode nodes (FLUX.2 [klein], Z-Image): prompt and negative to CONDITIONING.

    A family's node sets ``TEXT_TYPE``, the tooltips, ``EMPTY_PROMPT`` (the message for an empty prompt) and
    ``conditioning`` (its family's ``make_conditioning``, as a staticmethod), and defines
    ``encode_pair(text_encoder, prompt, negative_prompt, runtime) -> (positive, negative)`` feature tensors; a
    class missing one fails when it is defined. The widgets, the empty-prompt check and the move to ComfyUI's intermediate device are
    the same for every family, so they live here once.
    """

    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    TEXT_TYPE = ""
    TEXT_TOOLTIP = ""
    PROMPT_TOOLTIP = ""
    NEGATIVE_TOOLTIP = ""
    EMPTY_PROMPT = "The prompt is empty. Describe the picture to make."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (cls.TEXT_TYPE, {"tooltip": cls.TEXT_TOOLTIP}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                      "tooltip": cls.PROMPT_TOOLTIP}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": cls.NEGATIVE_TOOLTIP}),
            }
        }

    def encode(self, text_encoder, prompt, negative_prompt=""):
        if not prompt.strip():
            raise EditKitError(self.EMPTY_PROMPT)
        runtime = bridge.runtime()
        positive, negative = self.encode_pair(text_encoder, prompt, negative_prompt, runtime)
        device = runtime.intermediate_device
        return self.conditioning(positive.to(device)), self.conditioning(negative.to(device))

    def __init_subclass__(cls, **kwargs):
        """A family node must say how it encodes and packs its prompts: checked when the node class is defined."""
        super().__init_subclass__(**kwargs)
        missing = [name for name in ("encode_pair", "conditioning", "TEXT_TYPE") if not getattr(cls, name, None)]
        if missing:
            raise TypeError(f"{cls.__name__} must define {', '.join(missing)} (see PromptPairEncode)")


def batch_input() -> tuple:
    return ("INT", {"default": 1, "min": 1, "max": 64,
                    "tooltip": "Results per input image (each with different noise from the same seed)."})


def flux_text(conditioning, transformer_config, widget_guidance: float) -> tuple[FluxText, float]:
    """Read a Flux CONDITIONING for a transformer and pick the guidance to use."""
    text = read_conditioning(
        conditioning, transformer_config.joint_attention_dim, transformer_config.pooled_projection_dim
    )
    guidance = widget_guidance
    if text.guidance is not None and text.guidance != widget_guidance:
        log.info("EditKit: using guidance %.2f from the CONDITIONING (widget: %.2f).", text.guidance, widget_guidance)
        guidance = text.guidance
    return text, guidance


def model_precision(kind: str, requested: torch.dtype | None, file: Path | None, folder: Path | None = None,
                    subfolder: str = "transformer", compute: torch.dtype | None = None) -> Precision:
    """Storage and compute dtype for a loader's model: ComfyUI's rule (``bridge.precision``), except that with
    ``auto`` a bf16/fp16 file (or folder) stays in its own dtype where the device computes in fp32 (a CPU), cast
    per layer, instead of being widened to twice its size (issue 17: storage keeps the file's precision).

    ``compute`` replaces the rule's compute dtype (Qwen-Image refuses fp16). An explicit choice on the node is
    stored as asked. The cost is one cast per layer and call: a few percent of a step at real picture sizes, where
    the matmuls dominate (measured in docs/precision-and-gguf.md); choose fp32 on the node to avoid it.
    """
    chosen = bridge.precision(kind, requested)
    if compute is not None:
        chosen = Precision(compute if chosen.storage == chosen.compute else chosen.storage, compute)
    if requested is not None or chosen.compute != torch.float32 or chosen.storage != torch.float32:
        return chosen
    stored = stored_float_dtype(file if file is not None else (folder / subfolder if folder is not None else None))
    return Precision(stored, torch.float32) if stored in HALF_TYPES else chosen


def files_signature(paths) -> str:
    """Size and modification time of model files (or of every file in a model folder).

    Loader nodes return this from IS_CHANGED, so replacing a checkpoint under the same name (e.g.
    a newer training checkpoint) reloads it instead of reusing ComfyUI's cached output.
    """
    parts = []
    for path in paths:
        if path is None:
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        parts += [repr(file_key(p)) for p in files]
    return "|".join(parts)


def chosen_file(value: str, folder: str):
    """The path of a loader's file widget, or None for "(none)" / "(from folder)"."""
    return None if value in (NONE, FROM_FOLDER, "", None) else bridge.model_path(folder, value)


def chosen_folder(value: str):
    """The path of a loader's ``models/diffusers`` folder widget, or None for "(none)"."""
    return None if value in (NONE, "", None) else bridge.model_path("diffusers", value)


def pipeline_folders(*classes: str) -> list[str]:
    """``models/diffusers`` folders whose ``model_index.json`` names one of these pipeline classes, in the order
    of ``classes``: a loader's default folder, so a new loader never starts on another model's folder."""
    found: dict[str, str] = {}
    for name in bridge.list_diffusers_folders():
        try:
            with open(bridge.model_path("diffusers", name) / "model_index.json", encoding="utf-8") as handle:
                found[name] = json.load(handle).get("_class_name", "")
        except (OSError, ValueError, AttributeError, EditKitError):
            continue
    return [name for cls in classes for name in sorted(found) if found[name] == cls]


def loader_signature(diffusers_folder: str | None, *files: tuple[str, str]) -> str:
    """A loader's IS_CHANGED: size and mtime of its chosen folder and files (``(widget value, models folder)``).

    A missing file gives "" here: the load itself reports it, with the folder and what was expected.
    """
    try:
        folder = chosen_folder(diffusers_folder) if diffusers_folder is not None else None
        return files_signature([folder, *(chosen_file(v, f) for v, f in files)])
    except EditKitError:
        return ""


def latent_dict(raw_latents: torch.Tensor) -> dict:
    """LATENT in ComfyUI's convention: raw VAE space, float32, CPU."""
    return {"samples": raw_latents.float().cpu()}


# --------------------------------------------------------------------------------------------------------------
# What a loader's file widgets may name, checked when a prompt is queued (VALIDATE_INPUTS)


@dataclass(frozen=True)
class ModelFile:
    """One file widget of a loader: the ComfyUI models folder it lists, what belongs there (with where to get
    it, for names the bundled workflows do not use), and the diffusers sub-folder it replaces, if any."""

    folder: str
    what: str
    component: str | None = None


@dataclass(frozen=True)
class LoaderFiles:
    """A loader's model choices, checked by its ``VALIDATE_INPUTS`` before anything runs.

    ComfyUI skips its own "Value not in list" check for every input ``VALIDATE_INPUTS`` takes (execution.py
    0.3.64, ``validate_inputs``), so a missing file gets EditKit's message: the folder it looked in, what to
    put there and where to get it (from ``workflows/notes/models.json`` for the names the templates use). Files
    and the diffusers sub-folders the loader will read are checked for completeness from their headers
    (:mod:`..pipelines.core.integrity`), so a broken download is reported on the loader, at once.

    ComfyUI reports a failed check once per input the function takes, so the message is one short paragraph.
    """

    files: dict[str, ModelFile]
    folder_what: str | None = None  # what diffusers_folder should hold; None: the loader has no folder widget

    def check(self, **values) -> bool | str:
        problems: list[str] = []
        folder = None
        chosen = values.get("diffusers_folder")
        if self.folder_what is not None and isinstance(chosen, str) and chosen not in (NONE, ""):
            folder, problem = self._folder(chosen)
            if problem:
                problems.append(problem)
        components = []
        for widget, spec in self.files.items():
            value = values.get(widget)
            if value is None:
                continue  # a linked input: its value is known only when the graph runs
            if value in (FROM_FOLDER, NONE):
                if folder is not None and spec.component:
                    components.append(spec.component)
                continue
            problem = _file_problem(widget, value, spec)
            if problem:
                problems.append(problem)
        if folder is not None:
            for damage in integrity.folder_damage(folder, components):
                where = damage.path.relative_to(folder).as_posix()
                problems.append(f"diffusers_folder '{chosen}': {where} is {damage.problem}; download it again"
                                f"{_folder_source(chosen)}.")
        return True if not problems else " ".join(problems)

    def _folder(self, name: str) -> tuple[Path | None, str | None]:
        path = _find("diffusers", name)
        entry = known_model(name)
        if path is None:
            dirs = bridge.folder_dirs("diffusers")
            target = dirs[0] / name if dirs else Path("models/diffusers") / name
            if entry and entry.get("repo"):
                get = f"download every file of Hugging Face {entry['repo']} into {target}"
            else:
                get = f"put {self.folder_what} there under this name"
            return None, (f"diffusers_folder '{name}' is not in {_looked_in('diffusers')}: {get}, or choose (none) "
                          "and pick single files.")
        if not (path / "model_index.json").is_file():
            return None, (f"diffusers_folder '{name}' ({path}) has no model_index.json: it is not a whole diffusers "
                          f"folder. Download the whole repository{_folder_source(name)}.")
        return path, None


def _find(folder: str, name: str) -> Path | None:
    if ".." in Path(name).parts:
        return None
    return next((base / name for base in bridge.folder_dirs(folder) if (base / name).exists()), None)


def _looked_in(folder: str) -> str:
    """Where ComfyUI looks for ``folder``: its first directory (and how many more there are)."""
    dirs = bridge.folder_dirs(folder)
    if not dirs:
        return f"any models/{folder} folder (none is configured)"
    more = f" (or {len(dirs) - 1} other {folder} folder{'s' if len(dirs) > 2 else ''})" if len(dirs) > 1 else ""
    return f"{dirs[0]}{more}"


def _file_problem(widget: str, name, spec: ModelFile) -> str | None:
    if not isinstance(name, str) or not name:
        return f"{widget}: pick a file from ComfyUI's models/{spec.folder} folder."
    path = _find(spec.folder, name)
    entry = known_model(name)
    if path is None:
        if entry:
            get = f"download {entry['url']} into it" if entry.get("url") else f"get it from {entry['source']}"
        else:
            get = f"put {spec.what} there"
        return f"{widget} '{name}' is not in {_looked_in(spec.folder)}: {get}, or pick another file."
    if not path.is_file():
        return f"{widget} '{name}' ({path}) is a folder, not a model file: pick a file."
    problem = integrity.file_damage(path)
    if problem:
        source = f" from {entry['url']}" if entry and entry.get("url") else ""
        return f"{widget}: {path} is {problem}; download it again{source}."
    return None


_MODELS_TABLE = Path(__file__).resolve().parents[1] / "workflows" / "notes" / "models.json"


@functools.lru_cache(maxsize=1)
def _models_table() -> dict:
    try:
        with open(_MODELS_TABLE, encoding="utf-8") as handle:
            return json.load(handle)["models"]
    except (OSError, ValueError, KeyError):
        return {}


def known_model(name: str) -> dict | None:
    """The ``workflows/notes/models.json`` entry of a model file or folder the bundled workflows name."""
    return _models_table().get(name)


def _folder_source(name: str) -> str:
    entry = known_model(name)
    if entry and entry.get("repo"):
        return f" from Hugging Face {entry['repo']}"
    return ""


def compile_input() -> tuple:
    """The ``compile`` input of every loader node whose transformer has repeated blocks."""
    return (list(regional.COMPILE_CHOICES), {"default": "auto", "tooltip": regional.COMPILE_TOOLTIP})


def with_compile(transformer, setting: str, file: Path | None = None):
    """The loader's transformer handle, compiled per ``setting`` (pipelines/core/compile.py).

    ``auto`` is decided here, from the device ComfyUI will run the model on and the file type, so that
    where it means "off" the handle stays the shared one (no second copy of the model); a compiled
    model is a separate load, because compiling changes the module in place.
    """
    regional.check_setting(setting)
    device = bridge.compute_device("diffusion")
    quantized = file is not None and Path(file).suffix == ".gguf"
    if setting == "off" or (setting == "auto" and not regional.pays_on(device, quantized)):
        return transformer
    return transformer.derived(f"compiled/{device.type}", lambda c: _compiled(c, device), transformer.description)


def _compiled(component, device):
    regional.apply(component, "on", device)
    return component
