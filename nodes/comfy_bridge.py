"""The one module of EditKit that imports ComfyUI.

Every ComfyUI import is guarded, so the pack (and its tests, the smoke command and the
training CLI) imports without ComfyUI. Inside ComfyUI this module:

* wraps every EditKit model in a ``ModelPatcher`` (through a small container module,
  because diffusers and transformers models have a read-only ``device`` property that
  ``ModelPatcher.load`` writes) so ComfyUI's memory manager loads, offloads and frees it,
  and ``/free`` and "Unload models" act on it;
* always asks for a full load (``force_full_load=True``): diffusers layers are not
  ComfyUI cast-capable, and a partial load would leave some layers on the CPU and then fail
  with a device mismatch (see research/comfyui-memory.md §1.3). Under ``--novram`` ComfyUI
  loads nothing and EditKit runs the model where its weights are (the CPU);
* reports progress with ``comfy.utils.ProgressBar`` (with latent previews when the user
  enabled a preview method) and checks ComfyUI's interrupt flag once per step;
* lists model files through ``folder_paths`` and registers ``background_removal`` when the
  running ComfyUI does not know it yet.

Without ComfyUI the same functions fall back to plain torch and to a models folder given by
:func:`set_models_root` (or the ``EDITKIT_MODELS_DIR`` environment variable), laid out like
ComfyUI's ``models/`` folder.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path

import torch

from ..pipelines.core.errors import EditKitError, ModelFileError
from ..pipelines.core.runtime import Component, Progress, Runtime, TorchRuntime

log = logging.getLogger("EditKit")

try:  # ComfyUI's core modules; present only inside a running ComfyUI.
    import comfy.model_management as _mm
    import comfy.model_patcher as _model_patcher
    import comfy.utils as _comfy_utils
except ImportError:
    _mm = None
    _model_patcher = None
    _comfy_utils = None

try:
    import folder_paths as _folder_paths
except ImportError:
    _folder_paths = None

try:  # latent previews are optional even inside ComfyUI
    import comfy.latent_formats as _latent_formats
    import latent_preview as _latent_preview
except ImportError:
    _latent_formats = None
    _latent_preview = None

HAVE_COMFY = _mm is not None and _model_patcher is not None

# Folders EditKit reads, with the ComfyUI folder names they map to when the pack runs
# without ComfyUI (relative to the models root). ``unet`` and ``clip`` are ComfyUI's
# legacy aliases, listed so files there are found too.
_FALLBACK_FOLDERS = {
    "diffusers": ["diffusers"],
    "diffusion_models": ["diffusion_models", "unet"],
    "vae": ["vae"],
    "text_encoders": ["text_encoders", "clip"],
    "clip_vision": ["clip_vision"],
    "style_models": ["style_models"],
    "loras": ["loras"],
    "background_removal": ["background_removal"],
}

TRANSFORMER_EXTENSIONS = (".safetensors", ".sft", ".gguf")
WEIGHT_EXTENSIONS = (".safetensors", ".sft")
BEN2_EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt")

_models_root: Path | None = None


def set_models_root(path: str | os.PathLike | None) -> None:
    """Use ``path`` as the models folder when ComfyUI's ``folder_paths`` is absent."""
    global _models_root
    _models_root = Path(path) if path is not None else None


def _fallback_root() -> Path | None:
    if _models_root is not None:
        return _models_root
    env = os.environ.get("EDITKIT_MODELS_DIR")
    return Path(env) if env else None


def register_model_folder(name: str, extensions) -> None:
    """Add ``models/<name>`` to ComfyUI's folder list if this ComfyUI lacks it.

    Existing registrations (from ComfyUI itself or ``extra_model_paths.yaml``) are kept and
    only gain the extensions EditKit reads.
    """
    if _folder_paths is None:
        return
    table = _folder_paths.folder_names_and_paths
    if name in table:
        paths, exts = table[name]
        table[name] = (paths, set(exts) | set(extensions))
    else:
        table[name] = ([os.path.join(_folder_paths.models_dir, name)], set(extensions))


def folder_dirs(folder: str) -> list[Path]:
    """Every directory ComfyUI (or the fallback root) searches for ``folder``."""
    if _folder_paths is not None:
        try:
            return [Path(p) for p in _folder_paths.get_folder_paths(folder)]
        except KeyError:
            return []
    root = _fallback_root()
    if root is None:
        return []
    return [root / sub for sub in _FALLBACK_FOLDERS.get(folder, [folder])]


def list_models(folder: str, extensions) -> list[str]:
    """Files under ``folder`` with one of ``extensions``, as relative paths (sorted).

    Walked directly instead of ``folder_paths.get_filename_list`` because ComfyUI's own
    extension lists do not include ``.gguf``.
    """
    extensions = tuple(e.lower() for e in extensions)
    found: set[str] = set()
    for base in folder_dirs(folder):
        if not base.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(base, followlinks=True):
            for fname in files:
                if fname.lower().endswith(extensions):
                    found.add(Path(dirpath, fname).relative_to(base).as_posix())
    return sorted(found)


def list_diffusers_folders() -> list[str]:
    """Sub-folders of ``models/diffusers`` that hold a ``model_index.json``."""
    found: set[str] = set()
    for base in folder_dirs("diffusers"):
        if not base.is_dir():
            continue
        for dirpath, dirs, files in os.walk(base, followlinks=True):
            if "model_index.json" in files:
                found.add(Path(dirpath).relative_to(base).as_posix())
                dirs.clear()  # a pipeline folder's sub-folders are its components
    return sorted(found)


def model_path(folder: str, name: str) -> Path:
    """Absolute path of ``name`` in ``folder``; a clear error if it is not there."""
    if not name:
        raise EditKitError(f"No model selected for '{folder}'. Pick a file in the loader node.")
    if ".." in Path(name).parts:
        raise EditKitError(f"Model name '{name}' must not leave the '{folder}' folder.")
    dirs = folder_dirs(folder)
    for base in dirs:
        candidate = base / name
        if candidate.exists():
            return candidate
    searched = ", ".join(str(d) for d in dirs) or "(no folder configured)"
    raise ModelFileError(
        Path(dirs[0] if dirs else folder) / name,
        "Model file not found",
        f"a file in ComfyUI's models/{folder} folder (searched: {searched}); put it there or pick another file",
    )


def comfy_tokenizer_dir(which: str) -> Path | None:
    """Tokenizer files bundled with ComfyUI: ``which`` is ``"clip_l"`` or ``"t5"``."""
    if _folder_paths is None:
        return None
    base = Path(_folder_paths.base_path) / "comfy"
    path = {"clip_l": base / "sd1_tokenizer", "t5": base / "text_encoders" / "t5_tokenizer"}[which]
    return path if path.is_dir() else None


# --------------------------------------------------------------------------------------
# Memory management


class _Holder(torch.nn.Module):
    """Container ComfyUI's ModelPatcher can write ``device`` on (diffusers models cannot)."""

    def __init__(self, component: Component):
        super().__init__()
        self.model = component.module
        self._dtype = component.dtype

    def get_dtype(self):
        return self._dtype


def _devices(kind: str) -> tuple[torch.device, torch.device]:
    if kind == "text_encoder":
        return _mm.text_encoder_device(), _mm.text_encoder_offload_device()
    if kind == "vae":
        return _mm.vae_device(), _mm.vae_offload_device()
    return _mm.get_torch_device(), _mm.unet_offload_device()


class _ComfyProgress(Progress):
    def __init__(self, total: int):
        super().__init__(total)
        self._bar = _comfy_utils.ProgressBar(total)
        self._previewer = None
        if _latent_preview is not None and _latent_formats is not None:
            try:
                self._previewer = _latent_preview.get_previewer(_mm.get_torch_device(), _latent_formats.Flux())
            except Exception as exc:  # a broken preview setup must never stop a run
                log.debug("EditKit: no latent previews (%s)", exc)

    def update(self, preview=None, n: int = 1) -> None:
        self.value = min(self.total, self.value + n)
        image = None
        if preview is not None and self._previewer is not None:
            image = self._previewer.decode_latent_to_preview_image("JPEG", preview().float())
        self._bar.update_absolute(self.value, self.total, image)


def _castable_classes() -> dict[type, type]:
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    mapping = {torch.nn.Linear: ops.Linear, torch.nn.Conv2d: ops.Conv2d, torch.nn.GroupNorm: ops.GroupNorm,
               torch.nn.LayerNorm: ops.LayerNorm}
    if hasattr(torch.nn, "RMSNorm") and hasattr(ops, "RMSNorm"):
        mapping[torch.nn.RMSNorm] = ops.RMSNorm
    return mapping


def make_castable(module: torch.nn.Module) -> bool:
    """Let ComfyUI stream ``module``'s weights layer by layer in low-VRAM modes.

    Swaps the class of exact ``torch.nn`` Linear / Conv2d / GroupNorm / LayerNorm / RMSNorm
    instances for ComfyUI's cast-capable subclasses (same parameters, same maths; with casting
    off they run the parent class's forward). Returns True when every parameter now lives in a
    cast-capable layer and the model has no buffers, i.e. when a partial load is safe. Subclasses
    such as diffusers' GGUFLinear are never touched (their packed bytes must not be cast).
    """
    mapping = _castable_classes()
    for layer in module.modules():
        target = mapping.get(type(layer))
        if target is not None:
            layer.__class__ = target
            if not hasattr(layer, "bias"):  # ComfyUI's cast reads .bias; torch's RMSNorm has none
                layer.bias = None
    for layer in module.modules():
        if not hasattr(layer, "comfy_cast_weights") and any(True for _ in layer.parameters(recurse=False)):
            return False
    return not any(True for _ in module.buffers())


class ComfyRuntime(Runtime):
    """Runtime backed by ComfyUI's model management, ProgressBar and interrupt flag.

    FLUX.1 transformers and VAEs (dense weights) are made cast-capable, so ``--lowvram`` and
    tight VRAM load part of them and stream the rest layer by layer, as ComfyUI does with its own
    models. Everything else (GGUF weights, text encoders, BEN2) is loaded whole or, under
    ``--novram``, run where ComfyUI leaves it (the CPU).
    """

    def __init__(self):
        self._patchers: weakref.WeakKeyDictionary[Component, tuple] = weakref.WeakKeyDictionary()

    def patcher(self, component: Component):
        return self._entry(component)[0]

    def _entry(self, component: Component) -> tuple:
        entry = self._patchers.get(component)
        if entry is None:
            load_device, offload_device = _devices(component.kind)
            streamable = component.kind in ("diffusion", "vae") and not component.quantized
            castable = streamable and make_castable(component.module)
            patcher = _model_patcher.ModelPatcher(_Holder(component), load_device, offload_device)
            entry = self._patchers[component] = (patcher, castable)
        return entry

    def acquire(self, component: Component, memory_required: int = 0) -> torch.device:
        patcher, castable = self._entry(component)
        _mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=not castable)
        if castable:
            return patcher.load_device  # layers left on the CPU cast their weights to it per call
        return component.device  # loaded whole, or (--novram) left where it is

    def progress(self, total: int) -> Progress:
        return _ComfyProgress(total)

    def check_interrupt(self) -> None:
        _mm.throw_exception_if_processing_interrupted()

    @property
    def intermediate_device(self) -> torch.device:
        return _mm.intermediate_device()

    def empty_cache(self) -> None:
        _mm.soft_empty_cache()


_RUNTIME: Runtime | None = None


def runtime() -> Runtime:
    """The process-wide runtime: ComfyUI's when running inside it, plain torch otherwise."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = ComfyRuntime() if HAVE_COMFY else TorchRuntime()
    return _RUNTIME


def set_runtime(rt: Runtime | None) -> None:
    """Replace the runtime (tests use a TorchRuntime they can interrupt)."""
    global _RUNTIME
    _RUNTIME = rt


def default_dtype(kind: str = "diffusion") -> torch.dtype:
    """The compute dtype for a model of ``kind``.

    bf16 on CUDA (fp16 where bf16 is unsupported), fp32 with ``--cpu`` or without a GPU. When
    ComfyUI keeps text encoders on the CPU of a GPU machine (low-VRAM modes) they use bf16, so
    T5-XXL takes 9.5 GB of RAM instead of 19 GB. The FLUX.1 VAE is never fp16 (it overflows to
    black pictures): bf16 where supported, else fp32, and ComfyUI's --fp32-vae/--bf16-vae apply.
    """
    if HAVE_COMFY:
        device = _devices(kind)[0]
        if kind == "vae":
            return _mm.vae_dtype(device, [torch.bfloat16, torch.float32])
        if _mm.is_device_cpu(device):
            return torch.float32 if _mm.cpu_mode() else torch.bfloat16
        return torch.bfloat16 if _mm.should_use_bf16(device) else torch.float16
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32 if kind == "vae" else torch.float16
    return torch.float32
