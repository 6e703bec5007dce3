"""The one module of EditKit that imports ComfyUI.

Every ComfyUI import is guarded, so the pack (and its tests, the smoke command and the
training CLI) imports without ComfyUI. Inside ComfyUI this module:

* wraps every EditKit model in a ``ModelPatcher`` (through a small container module,
  because diffusers and transformers models have a read-only ``device`` property that
  ``ModelPatcher.load`` writes) so ComfyUI's memory manager loads, offloads and frees it,
  and ``/free`` and "Unload models" act on it;
* makes every model cast-capable (torch layers become ComfyUI's ``comfy.ops`` layers; EditKit's own
  cast and GGUF layers gain ComfyUI's cast protocol; every other module holding tensors gets
  core.casting's generic cast-on-forward hook), so ``--lowvram`` loads part of each model and streams
  the rest layer by layer (GGUF and fp8 weights stay in their format on the CPU and are cast on the
  GPU per layer), as ComfyUI does with its own models (research/comfyui-memory.md §1.3);
* lets ComfyUI's precision flags and per-device rules decide every ``auto`` dtype
  (:func:`precision`): ``--fp32-unet``/``--bf16-unet``/``--fp16-unet``/``--fp8_e4m3fn-unet``…,
  the text-encoder and VAE flags, ``unet_dtype``/``unet_manual_cast``/``text_encoder_dtype``/
  ``vae_dtype``; an explicit dtype chosen on a node still wins;
* empties the dequantized-layer cache of GGUF models whenever the memory manager unloads them
  (fully or partly), and lends it part of the memory ComfyUI reports free (CPU compute only);
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
from ..pipelines.core.precision import Precision, auto_precision, resolve, set_fp8_matmul
from ..pipelines.core.runtime import Component, Progress, Runtime, TorchRuntime, default_device

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


def input_directory() -> Path | None:
    """ComfyUI's input folder (where Load Image looks), or None without ComfyUI."""
    if _folder_paths is None:
        return None
    return Path(_folder_paths.get_input_directory())


def comfy_tokenizer_dir(which: str) -> Path | None:
    """Tokenizer files bundled with ComfyUI: ``which`` is ``"clip_l"``, ``"t5"`` or ``"qwen25"``.

    ``qwen25`` (Qwen2.5's BPE files) also serves Qwen3 (Z-Image's encoder), whose vocabulary it shares.
    """
    if _folder_paths is None:
        return None
    base = Path(_folder_paths.base_path) / "comfy"
    path = {"clip_l": base / "sd1_tokenizer", "t5": base / "text_encoders" / "t5_tokenizer",
            "qwen25": base / "text_encoders" / "qwen25_tokenizer"}[which]
    return path if path.is_dir() else None


# --------------------------------------------------------------------------------------
# Memory management


class _Holder(torch.nn.Module):
    """Container ComfyUI's ModelPatcher can write ``device`` on (diffusers models cannot).

    Also reaches the component's :meth:`~Component.drop_caches`, which the patcher calls when
    ComfyUI takes memory back (see :func:`_patcher_class`), through a *weak* method: the runtime keeps
    the patcher (and so this holder) as the value of a ``WeakKeyDictionary`` keyed by the component, and
    a strong reference back to the key from its value keeps the key alive for ever (issue 17, fault 1:
    no EditKit model was ever freed).
    """

    def __init__(self, component: Component):
        super().__init__()
        self.model = component.module
        self._dtype = component.dtype
        self._drop_caches = weakref.WeakMethod(component.drop_caches)

    def drop_caches(self) -> None:
        drop = self._drop_caches()
        if drop is not None:  # a collected component has no caches left to drop
            drop()

    def get_dtype(self):
        return self._dtype


_PATCHER_CLASS = None


def _patcher_class():
    """ComfyUI's ModelPatcher, plus: empty EditKit's side caches when ComfyUI really takes memory back.

    ``detach(unpatch_all=True)`` is a real unload (``LoadedModel.model_unload``: eviction, "Unload
    models", ``/free``) and ``partially_unload`` evicts part of the model for another one; both drop
    the caches. ``detach(unpatch_all=False)`` is NOT an unload: ``load_models_gpu`` calls it on a
    model that is already loaded right before loading it again (every acquire of a model that stays
    loaded), so the dequantized-layer cache must survive it (issue 23: it was emptied at the start of
    every sampling run). A model dropped from ``current_loaded_models`` by garbage collection takes
    its cache with it.
    """
    global _PATCHER_CLASS
    if _PATCHER_CLASS is None:
        base = _model_patcher.ModelPatcher

        class EditKitModelPatcher(base):
            def detach(self, unpatch_all=True):
                if unpatch_all:
                    self.model.drop_caches()
                return super().detach(unpatch_all)

            def partially_unload(self, device_to, memory_to_free=0):
                self.model.drop_caches()
                return super().partially_unload(device_to, memory_to_free)

        _PATCHER_CLASS = EditKitModelPatcher
    return _PATCHER_CLASS


def compute_device(kind: str = "diffusion") -> torch.device:
    """Where ComfyUI will run a model of ``kind`` (without ComfyUI: the default torch device)."""
    return _devices(kind)[0] if HAVE_COMFY else default_device()


def _devices(kind: str) -> tuple[torch.device, torch.device]:
    if kind == "text_encoder":
        return _mm.text_encoder_device(), _mm.text_encoder_offload_device()
    if kind == "vae":
        return _mm.vae_device(), _mm.vae_offload_device()
    return _mm.get_torch_device(), _mm.unet_offload_device()


class _ComfyProgress(Progress):
    def __init__(self, total: int, preview_format: str = "Flux"):
        super().__init__(total)
        self._bar = _comfy_utils.ProgressBar(total)
        self._previewer = None
        if _latent_preview is not None and _latent_formats is not None:
            try:
                fmt = getattr(_latent_formats, preview_format)()
                self._previewer = _latent_preview.get_previewer(_mm.get_torch_device(), fmt)
            except Exception as exc:  # a broken preview setup must never stop a run
                log.debug("EditKit: no latent previews (%s)", exc)

    def update(self, preview=None, n: int = 1) -> None:
        self.value = min(self.total, self.value + n)
        image = None
        if preview is not None and self._previewer is not None:
            image = self._previewer.decode_latent_to_preview_image("JPEG", preview().float())
        self._bar.update_absolute(self.value, self.total, image)


_CASTABLE: dict[type, type] = {}


def _castable_classes() -> dict[type, type]:
    """Class swaps that make layers cast-capable for ComfyUI's memory manager.

    Exact torch layers → ComfyUI's ``comfy.ops.disable_weight_init`` layers. EditKit's own layers
    that already work with weights on any device (core.precision's cast layers, core.matmul's Linear,
    core.gguf's GGUF layer) → a subclass that adds ComfyUI's cast protocol (``comfy_cast_weights``,
    ``weight_function``, ``bias_function``) and keeps EditKit's forward, so quantized bytes are
    never handed to ComfyUI's float cast.
    """
    if not _CASTABLE:
        import comfy.ops

        from ..pipelines.core import matmul as core_matmul
        from ..pipelines.core import precision as core_precision

        ops = comfy.ops.disable_weight_init
        mapping = {torch.nn.Linear: ops.Linear, torch.nn.Conv1d: ops.Conv1d, torch.nn.Conv2d: ops.Conv2d,
                   torch.nn.Conv3d: ops.Conv3d, torch.nn.GroupNorm: ops.GroupNorm, torch.nn.LayerNorm: ops.LayerNorm,
                   torch.nn.Embedding: ops.Embedding}
        if hasattr(torch.nn, "RMSNorm") and hasattr(ops, "RMSNorm"):
            mapping[torch.nn.RMSNorm] = ops.RMSNorm
        own = [*core_precision.CAST_CLASSES.values(), core_matmul.Linear]
        try:
            from ..pipelines.core.gguf import GGUFLinear

            own.append(GGUFLinear)
        except ImportError:  # no diffusers/gguf: no GGUF models either
            pass
        for cls in own:
            mapping[cls] = type(f"Comfy{cls.__name__}", (cls, comfy.ops.CastWeightBiasOp), {})
        _CASTABLE.update(mapping)
    return _CASTABLE


def make_castable(module: torch.nn.Module, load_device: torch.device | None = None) -> bool:
    """Let ComfyUI stream ``module``'s weights layer by layer in low-VRAM modes; True when it can.

    Plain torch layers become ComfyUI's own cast-capable layers (:func:`_castable_classes`; same
    parameters, same maths; with casting off they run the parent class's forward). Every other module
    that holds tensors itself (diffusers' RMSNorm, QwenImageCausalConv3d, QwenImageRMS_norm, Z-Image's
    pad tokens on the model itself, rotary buffers, diffusers' GGUF layers...) gets core.casting's generic
    cast-on-forward hook, which EditKit keeps because comfy.ops has no class for those types and a swap
    per type would miss the next one (issue 17, fault 2). Afterwards no tensor is left that could sit on
    the wrong device, so a partial load is always safe.
    """
    from ..pipelines.core.casting import make_streamable
    from ..pipelines.core.matmul import Linear as OneDNNLinear

    mapping = _castable_classes()
    if load_device is not None and load_device.type != "cpu":  # oneDNN's products are for CPU compute only:
        mapping = {**mapping, OneDNNLinear: _castable_classes()[torch.nn.Linear]}  # ComfyUI's own Linear there
    for layer in module.modules():
        target = mapping.get(type(layer))
        if target is not None:
            layer.__class__ = target
            if not hasattr(layer, "bias"):  # ComfyUI's cast reads .bias; torch's RMSNorm has none
                layer.bias = None
    make_streamable(module, skip=lambda layer: type(layer) in mapping.values())
    return True


class ComfyRuntime(Runtime):
    """Runtime backed by ComfyUI's model management, ProgressBar and interrupt flag.

    Every model (transformers, VAEs, text encoders, BEN2; dense, fp8 or GGUF) is made cast-capable
    (:func:`make_castable`), so ``--lowvram`` and tight VRAM load part of it and stream the rest layer
    by layer, as ComfyUI does with its own models.
    """

    def __init__(self):
        self._patchers: weakref.WeakKeyDictionary[Component, tuple] = weakref.WeakKeyDictionary()

    def patcher(self, component: Component):
        return self._entry(component)[0]

    def _entry(self, component: Component) -> tuple:
        entry = self._patchers.get(component)
        if entry is None:
            load_device, offload_device = _devices(component.kind)
            castable = make_castable(component.module, load_device)
            patcher = _patcher_class()(_Holder(component), load_device, offload_device)
            entry = self._patchers[component] = (patcher, castable)
        return entry

    def acquire(self, component: Component, memory_required: int = 0) -> torch.device:
        component.check_source()
        patcher, castable = self._entry(component)
        _mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=not castable)
        # castable: layers left on the CPU cast their weights to the load device per call;
        # otherwise: loaded whole, or (--novram) left where it is
        device = patcher.load_device if castable else component.device
        if "dequant_cache" in component.extras:
            self._lend_cache_memory(component, device, memory_required)
        return device

    @staticmethod
    def _lend_cache_memory(component: Component, device: torch.device, memory_required: int) -> None:
        """Give a GGUF model's dequantized-layer cache part of the memory ComfyUI reports free.

        Only for CPU compute: on a GPU, dequantizing a layer costs a few percent of its matmul,
        and VRAM is better left to ComfyUI's own accounting.
        """
        if not _mm.is_device_cpu(device):
            component.lend_cache_memory(0)
            return
        component.lend_cache_memory(max(0, _mm.get_free_memory(device) - memory_required))

    def progress(self, total: int, preview_format: str = "Flux") -> Progress:
        return _ComfyProgress(total, preview_format)

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
        if HAVE_COMFY and "EDITKIT_FP8_MATMUL" not in os.environ:  # the variable, when set, wins
            set_fp8_matmul(fp8_matmul_from_flags())
        _RUNTIME = ComfyRuntime() if HAVE_COMFY else TorchRuntime()
    return _RUNTIME


def fp8_matmul_from_flags() -> bool:
    """Whether fp8-stored Linear weights multiply in fp8 (``core.precision.fp8_linear``), as ComfyUI decides for
    its own fp8 layers: ``--fast`` (all features) or ``--fast fp8_matrix_mult``, on a device ComfyUI says computes
    in fp8 (``supports_fp8_compute``: NVIDIA Ada/Hopper and newer)."""
    try:
        from comfy.cli_args import PerformanceFeature, args
    except ImportError:
        return False
    if PerformanceFeature.Fp8MatrixMultiplication not in (args.fast or ()):
        return False
    return bool(_mm.supports_fp8_compute(_mm.get_torch_device()))


def set_runtime(rt: Runtime | None) -> None:
    """Replace the runtime (tests use a TorchRuntime they can interrupt)."""
    global _RUNTIME
    _RUNTIME = rt


# The dtypes FLUX.1-style transformers run in, in ComfyUI's order of preference (its Flux model config).
INFERENCE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _comfy_precision(kind: str, device: torch.device) -> Precision:
    """ComfyUI's own choice for a model of ``kind`` on ``device`` (its flags first).

    * ``diffusion``: storage ``unet_dtype`` (``--fp32-unet``, ``--bf16-unet``, ``--fp16-unet``, the fp8
      unet flags, else per device), compute ``unet_manual_cast`` of it (e.g. bf16 stored → fp32
      computed on a CPU), exactly as ComfyUI loads its own diffusion models;
    * ``text_encoder``: storage ``text_encoder_dtype`` (``--fp16-text-enc``, ``--fp32-text-enc``,
      ``--bf16-text-enc``, ``--fp8_e4m3fn-text-enc``…, else fp16), computed in fp32 as ComfyUI's text
      encoders are, so T5-XXL takes 9.5 GB of RAM, not 19;
    * ``vae``: ``vae_dtype`` among bf16/fp32 (FLUX.1-style VAEs overflow in fp16 unless
      ``--fp16-vae`` asks for it), stored and computed alike, as ComfyUI does;
    * anything else (BEN2): the diffusion rule without the unet flags' fp8 (bf16/fp16 where the
      device supports it, fp32 on a CPU).
    """
    if kind == "vae":
        dtype = _mm.vae_dtype(device, [torch.bfloat16, torch.float32])
        return Precision(dtype, dtype)
    if kind == "text_encoder":
        return Precision(_mm.text_encoder_dtype(device), torch.float32)
    if kind == "diffusion":
        storage = _mm.unet_dtype(device, supported_dtypes=INFERENCE_DTYPES)
        compute = _mm.unet_manual_cast(storage, device, INFERENCE_DTYPES) or storage
        return Precision(storage, compute)
    if _mm.is_device_cpu(device):
        return Precision(torch.float32, torch.float32)
    dtype = torch.bfloat16 if _mm.should_use_bf16(device) else torch.float16
    return Precision(dtype, dtype)


def precision(kind: str = "diffusion", requested: torch.dtype | None = None) -> Precision:
    """Storage and compute dtype of a model of ``kind``; ``requested`` (a node's explicit choice) wins.

    ``auto`` follows ComfyUI inside ComfyUI (:func:`_comfy_precision`) and
    :func:`~..pipelines.core.precision.auto_precision` outside it. An explicit choice is stored as
    asked and computed in what the device is fast at, with a one-line warning (once) when that is
    slower than the alternative (core.precision.resolve).
    """
    if HAVE_COMFY:
        device = _devices(kind)[0]
        auto = _comfy_precision(kind, device)
    else:
        device = default_device()
        auto = auto_precision(kind, device)
    return resolve(requested, auto, device)


def default_dtype(kind: str = "diffusion") -> torch.dtype:
    """One dtype for loaders that store and compute a model of ``kind`` in the same dtype.

    The ``auto`` compute dtype (:func:`precision`), except for text encoders inside ComfyUI, which
    ComfyUI stores in fp16 and computes in fp32: a single dtype there would double their memory, so
    it stays bf16/fp16 on a GPU and bf16 on the CPU of a GPU machine (fp32 with ``--cpu``). Loaders that
    separate storage and compute (the FLUX.1 loader) call :func:`precision` and get ComfyUI's rule.
    """
    if HAVE_COMFY and kind == "text_encoder":
        device = _devices(kind)[0]
        if _mm.is_device_cpu(device):
            return torch.float32 if _mm.cpu_mode() else torch.bfloat16
        return torch.bfloat16 if _mm.should_use_bf16(device) else torch.float16
    return precision(kind).compute
