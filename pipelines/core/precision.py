"""Storage dtype and compute dtype, chosen separately for every model.

A model's weights are *stored* in one dtype (what its memory costs) and *computed* in another
(what its arithmetic runs in). They differ when the device is slow at the storage dtype: a CPU
stores bf16 (half the memory of fp32) but computes in fp32, because CPUs without bf16 units
run bf16 arithmetic several times slower, and ComfyUI itself never computes in bf16 on a CPU.
The FLUX.1 transformer then costs 24 GB of RAM instead of 48, for a per-layer cast (about +20 %
per step against fp32 storage, measured in docs/precision-and-gguf.md).

Rules (:func:`compute_dtype_for`):

* fp32 storage computes in fp32;
* on a CPU, bf16 storage computes in bf16 only where the CPU has bf16 matrix instructions (AMX-BF16 or
  AVX512-BF16, where torch's bf16 matmuls are several times faster than fp32: 0.3x the time per Flux
  step on the benchmark CPU); every other case computes in fp32;
* on an accelerator bf16/fp16 compute in themselves where the device supports them, otherwise
  the other half type or fp32; fp8 storage computes in bf16 (or fp16, or fp32).

``auto`` (no explicit choice) takes what the host decides (inside ComfyUI its
``unet_dtype``/``text_encoder_dtype``/``vae_dtype`` and manual-cast rules, see
``nodes/comfy_bridge.py``; without ComfyUI :func:`auto_precision`). An explicit choice always
wins, but when it will be slower than the alternative a one-line warning says why and what to
pick instead, once per choice and device (:func:`resolve`).

Applying a precision (:func:`apply_precision`) swaps exact ``torch.nn`` Linear / Conv / Embedding
layers for subclasses that keep their weights in the storage dtype and cast them to the compute
dtype (and the input's device) at every call; everything else (norms, biases of other layers,
buffers) is kept in the compute dtype, which also keeps activations there (diffusers' and
transformers' norms cast activations to their weight's dtype when it is half precision). The
cast layers follow ComfyUI's ``weight_function``/``bias_function`` convention (functions applied to
the cast weight, set by ComfyUI's memory manager for low-VRAM patches) without importing ComfyUI.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import matmul
from .matmul import linear

log = logging.getLogger("EditKit")

HALF_TYPES = (torch.bfloat16, torch.float16)
FP8_TYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         **{t: str(t).replace("torch.float8_", "fp8_") for t in FP8_TYPES}}


def dtype_name(dtype: torch.dtype) -> str:
    return NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class Precision:
    """Where a model's weights live (``storage``) and what its arithmetic runs in (``compute``)."""

    storage: torch.dtype
    compute: torch.dtype

    @property
    def casts(self) -> bool:
        """True when every weighted layer casts its weight per call."""
        return self.storage != self.compute

    def __str__(self) -> str:
        if not self.casts:
            return dtype_name(self.compute)
        return f"{dtype_name(self.storage)} stored, {dtype_name(self.compute)} compute"


def cpu_fast_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16) that torch uses."""
    probe = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(probe, name, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def _accelerator_supports(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        if dtype == torch.bfloat16:
            return torch.cuda.is_bf16_supported()
        return dtype == torch.float16
    if device.type == "mps":
        return dtype == torch.float16
    return False


def compute_dtype_for(storage: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a model stored in ``storage`` computes in on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cpu" and storage == torch.bfloat16 and cpu_fast_bf16():
        return torch.bfloat16
    if storage == torch.float32 or device.type == "cpu" or device.type == "meta":
        return torch.float32
    if storage in HALF_TYPES and _accelerator_supports(device, storage):
        return storage
    for candidate in (torch.bfloat16, torch.float16):
        if _accelerator_supports(device, candidate):
            return candidate
    return torch.float32


def auto_precision(kind: str, device: torch.device | str) -> Precision:
    """EditKit's choice without ComfyUI: fp32 on the CPU (as ComfyUI: bf16 would be faster on CPUs with
    bf16 instructions, but less accurate, so it is an explicit choice there); bf16 (else fp16) on GPUs.

    The FLUX.1-style VAEs are never fp16 (they overflow to black pictures): bf16 where supported,
    else fp32.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return Precision(torch.float32, torch.float32)
    if _accelerator_supports(device, torch.bfloat16):
        return Precision(torch.bfloat16, torch.bfloat16)
    if kind == "vae":
        return Precision(torch.float32, torch.float32)
    return Precision(torch.float16, compute_dtype_for(torch.float16, device))


_WARNED: set[tuple] = set()
_WARNED_LOCK = threading.Lock()


def slow_choice_warning(storage: torch.dtype, device: torch.device) -> str | None:
    """The one-line warning for an explicit ``storage`` choice that runs slowly on ``device``, or None."""
    compute = compute_dtype_for(storage, device)
    if compute == storage:
        return None
    where = "this CPU" if device.type == "cpu" else f"this {device.type.upper()} device"
    if device.type == "cpu":
        cost = ("this CPU has no bf16 matrix instructions (AMX-BF16, AVX512-BF16), so each layer's weights are cast "
                "to fp32 at every call: about 20% slower than fp32, for half the memory")
        instead = "pick fp32 or auto for speed, keep it only if fp32 weights do not fit in RAM"
    else:
        cost = (f"{where} does not support {dtype_name(storage)} arithmetic, so each layer's weights are cast to "
                f"{dtype_name(compute)} at every call")
        instead = f"pick {dtype_name(compute)} or auto for speed"
    return f"EditKit: weight dtype {dtype_name(storage)} on {where}: {cost}; {instead}."


def resolve(requested: torch.dtype | None, auto: Precision, device: torch.device | str) -> Precision:
    """``auto`` when nothing was requested; else store ``requested`` and compute what the device is fast at.

    An explicit choice that costs speed logs :func:`slow_choice_warning` once per (choice, device type).
    """
    if requested is None:
        return auto
    device = torch.device(device)
    precision = Precision(requested, compute_dtype_for(requested, device))
    message = slow_choice_warning(requested, device)
    if message is not None:
        key = (requested, device.type)
        with _WARNED_LOCK:
            first = key not in _WARNED
            _WARNED.add(key)
        if first:
            log.warning(message)
    return precision


# --------------------------------------------------------------------------------------
# Layers that store one dtype and compute in another


def _hooked(tensor: torch.Tensor, functions) -> torch.Tensor:
    for function in functions:
        tensor = function(tensor)
    return tensor


def cast_weight_bias(layer: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    """``layer``'s weight and bias in ``dtype`` on ``device``, with host weight/bias functions applied.

    A weight kept in fp8 from a ComfyUI "scaled fp8" file is multiplied by its layer's ``weight_scale``
    (a Python float, so it needs no device) after the cast, as the file format prescribes.
    """
    weight = layer.weight.to(device=device, dtype=dtype, non_blocking=True)
    scale = getattr(layer, "weight_scale", None)
    if scale is not None and scale != 1.0:
        weight = weight * scale
    weight = _hooked(weight, getattr(layer, "weight_function", ()))
    bias = layer.bias
    if bias is not None:
        bias = _hooked(bias.to(device=device, dtype=dtype, non_blocking=True), getattr(layer, "bias_function", ()))
    return weight, bias


# --------------------------------------------------------------------------------------
# fp8 matrix multiplication (opt-in: ComfyUI's --fast, or EDITKIT_FP8_MATMUL=1)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP8_MATMUL: list[bool | None] = [None]  # None: follow the environment variable


def set_fp8_matmul(enabled: bool | None) -> None:
    """Multiply fp8-stored Linear weights in fp8 (True), never (False), or as ``EDITKIT_FP8_MATMUL`` says (None).

    The ComfyUI bridge calls it with ``comfy.model_management.supports_fp8_compute(device)`` when ComfyUI runs
    with ``--fast`` (fp8 matrix multiplication), as ComfyUI's own fp8 layers do.
    """
    _FP8_MATMUL[0] = enabled


def fp8_matmul_enabled() -> bool:
    if _FP8_MATMUL[0] is not None:
        return _FP8_MATMUL[0]
    import os

    return os.environ.get("EDITKIT_FP8_MATMUL", "") not in ("", "0")


def fp8_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` multiplied in fp8 by ``torch._scaled_mm``, or None where that cannot run.

    The weight is used as stored (float8_e4m3fn, times the layer's ``weight_scale``); the input is quantized to
    float8_e4m3fn with one scale for the whole tensor (its largest magnitude maps to 448, so nothing clips,
    unlike ComfyUI's fixed input scale 1). The products are summed in float32 and written in the compute dtype.
    Error against the per-layer cast (:class:`CastLinear`'s default path): the input's rounding to 3 mantissa
    bits, relative L2 about 2.5 % of the output on Gaussian inputs (tests/test_precision.py measures and bounds
    it at 4 %). Needs both matrix sides in multiples of 16 (``_scaled_mm``); weight function hooks (ComfyUI's
    low-VRAM LoRA patches) need the cast path too.
    """
    weight = layer.weight
    if weight.dtype != torch.float8_e4m3fn or getattr(layer, "weight_function", None) or \
            x.shape[-1] % 16 or weight.shape[0] % 16 or x.numel() == 0:
        return None
    try:
        rows = x.reshape(-1, x.shape[-1])
        amax = rows.abs().amax().float().clamp(min=1e-12)
        scale_a = (amax / FP8_MAX).reshape(())
        quantized = (rows.float() / scale_a).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        scale_b = torch.tensor(float(getattr(layer, "weight_scale", 1.0)), device=x.device)
        weight = weight.to(x.device, non_blocking=True)
        out = torch._scaled_mm(quantized, weight.t(), scale_a=scale_a, scale_b=scale_b,
                               out_dtype=layer.compute_dtype)
    except (RuntimeError, NotImplementedError):  # a device or shape _scaled_mm does not take: cast instead
        return None
    if layer.bias is not None:
        bias = _hooked(layer.bias.to(device=x.device, dtype=layer.compute_dtype), getattr(layer, "bias_function", ()))
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


CAST_CACHE_MAX_ROWS = 1536
"""A cast weight is kept only for products of fewer activation rows: casting bf16 to fp32 costs about 1.5 ns per
weight on the benchmark CPU and a 2-thread fp32 product about 0.01 ns per weight and row, so from 1536 rows on
the cast is under 10 % of the product and not worth the memory (FLUX.1 at 1024²: the 4096-row picture stream and
the single blocks cast per call; the text stream and the one-row modulation layers are kept)."""


class CastLinear(torch.nn.Linear):
    """A Linear whose weight is stored in a narrower dtype and cast to ``compute_dtype`` per call.

    With fp8 matrix multiplication switched on (:func:`set_fp8_matmul`), float8_e4m3fn weights multiply in fp8
    (:func:`fp8_linear`) instead. A diffusion model's cast layers share a weight cache (``dequant_cache``, the
    GGUF layers' :class:`~.gguf.DequantCache`, set by :func:`attach_cast_cache`): while the host lends it memory
    (on a CPU only, where the cast is a third of a 256² step), a cast weight of a layer that sees fewer than
    :data:`CAST_CACHE_MAX_ROWS` rows is kept and later calls skip the cast; the host empties it when it frees
    memory. Kept or cast again, the weight is the same, bit for bit.
    """

    compute_dtype = torch.float32
    dequant_cache = None
    cache_min_rows = 1
    _dense: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.weight.dtype == torch.float8_e4m3fn and fp8_matmul_enabled():
            out = fp8_linear(self, x)
            if out is not None:
                return out
        hooked = getattr(self, "weight_function", None) or getattr(self, "bias_function", None)
        kept = self._dense
        if kept is not None and not hooked and kept[0].device == x.device:
            return linear(x, *kept)
        weight, bias = cast_weight_bias(self, self.compute_dtype, x.device)
        cache = self.dequant_cache
        rows = x.numel() // max(1, x.shape[-1])
        if cache is not None and not hooked and cache.budget and rows < CAST_CACHE_MAX_ROWS \
                and not torch.is_grad_enabled():
            cache.offer(self, (weight, bias), rows, weight.numel() * weight.element_size())
        return linear(x, weight, bias)


class CastConv2d(torch.nn.Conv2d):
    """A Conv2d whose weight is stored in a narrower dtype and cast to ``compute_dtype`` per call."""

    compute_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        weight, bias = cast_weight_bias(self, self.compute_dtype, x.device)
        return self._conv_forward(x, weight, bias)


class CastEmbedding(torch.nn.Embedding):
    """An Embedding stored in a narrower dtype; looked-up rows are cast to ``compute_dtype``."""

    compute_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.device != ids.device:
            weight = weight.to(ids.device, non_blocking=True)
        rows = F.embedding(ids, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)
        return rows.to(self.compute_dtype)


CAST_CLASSES: dict[type, type] = {torch.nn.Linear: CastLinear, torch.nn.Conv2d: CastConv2d,
                                  torch.nn.Embedding: CastEmbedding}
# torch's Linear and core.matmul's (the same layer with oneDNN products): a plain, non-casting Linear
PLAIN_LINEARS = (torch.nn.Linear, matmul.Linear)
CAST_SOURCES: dict[type, type] = {**CAST_CLASSES, matmul.Linear: CastLinear}


def apply_precision(module: torch.nn.Module, precision: Precision, keep_prefixes: tuple[str, ...] = ()) -> torch.nn.Module:
    """Store ``module``'s Linear/Conv2d/Embedding weights in ``precision.storage``, the rest in its compute dtype.

    With equal dtypes this is ``module.to(dtype)``. Otherwise exact ``torch.nn`` Linear, Conv2d and
    Embedding layers become :class:`CastLinear` & co. (same parameters, same maths in the compute
    dtype; ComfyUI's bridge can stream them under ``--lowvram``); their weights are stored in the
    storage dtype and their biases in the compute dtype. Other parameters and buffers (norm scales,
    subclassed layers such as GGUF ones, which are left alone) are converted to the compute dtype.
    Works in place, layer by layer, so the peak memory is the larger of the two layouts of one layer.

    Layers a transformers model lists in ``_keep_in_fp32_modules`` (T5's ``wo``) stay in the compute
    dtype: transformers casts their *input* to their weight's dtype, so a narrower stored weight would
    round the activations. So do modules named with one of ``keep_prefixes`` (a family's layers whose model code
    picks its activations' dtype from the weight's, such as Z-Image's timestep embedder).
    """
    if not precision.casts:
        for tensor_owner in module.modules():
            if not _keeps_fp8(tensor_owner):
                _convert_direct(tensor_owner, precision.compute)
        return module
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, layer in module.named_modules():
        if _keeps_fp8(layer):  # the file's fp8 stays; only the dtype it computes in changes
            layer.compute_dtype = precision.compute
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(precision.compute)
            continue
        target = CAST_SOURCES.get(type(layer))
        if target is None or keep.intersection(name.split(".")) or (keep_prefixes and name.startswith(keep_prefixes)):
            _convert_direct(layer, precision.compute)
            continue
        layer.__class__ = target
        layer.compute_dtype = precision.compute
        layer.weight.data = layer.weight.data.to(precision.storage)
        if getattr(layer, "bias", None) is not None:
            layer.bias.data = layer.bias.data.to(precision.compute)
    return module


def attach_cast_cache(module: torch.nn.Module):
    """Give ``module``'s casting Linear layers (stored narrower than they compute) one shared weight cache and
    return it, or None when no layer casts. Its budget stays 0 until a host lends memory (CPU compute only)."""
    layers = [m for m in module.modules()
              if isinstance(m, CastLinear) and m.weight.dtype != m.compute_dtype and m.dequant_cache is None]
    if not layers:
        return None
    from .gguf import DequantCache

    cache = DequantCache()
    for layer in layers:
        layer.dequant_cache = cache
    return cache


def _keeps_fp8(layer: torch.nn.Module) -> bool:
    """A layer :func:`keep_fp8_layers` set up: its fp8 weight is cast per call, its bias is already set."""
    return isinstance(layer, CastLinear) and layer.weight.dtype in FP8_TYPES


def _convert_direct(layer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Convert ``layer``'s own floating parameters and buffers (not its children's) to ``dtype``.

    Quantized GGUF weights (packed bytes that carry a ``quant_type``) are left as they are.
    """
    for _name, param in layer.named_parameters(recurse=False):
        if param.is_floating_point() and not hasattr(param, "quant_type") and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for name, buffer in layer.named_buffers(recurse=False):
        if buffer.is_floating_point() and buffer.dtype != dtype:
            setattr(layer, name, buffer.to(dtype))


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def keep_fp8_layers(model: torch.nn.Module, scales: dict[str, float], compute: torch.dtype) -> int:
    """Make every Linear layer of ``model`` whose weight is fp8 a :class:`CastLinear` that keeps it (issue 17).

    The weight stays in the file's fp8 (half the memory of bf16, a quarter of fp32) and is cast to
    ``compute``, times its ``weight_scale`` (``scales["<layer>.weight"]``, default 1), at every call; the
    bias is stored in ``compute``. :func:`apply_precision` then leaves these layers alone. Returns how many.
    """
    kept = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, torch.nn.Linear) or layer.weight.dtype not in FP8_TYPES:
            continue
        if type(layer) in PLAIN_LINEARS:
            layer.__class__ = CastLinear
        layer.compute_dtype = compute
        layer.weight_scale = float(scales.get(f"{name}.weight" if name else "weight", 1.0))
        if layer.bias is not None and layer.bias.dtype != compute:
            layer.bias.data = layer.bias.data.to(compute)
        kept += 1
    return kept


def restore_fp8(model: torch.nn.Module, kept: dict[str, tuple[torch.Tensor, float]], compute: torch.dtype) -> int:
    """Put fp8 weights set aside before a library built ``model`` back into its Linear layers.

    Used where the library's loader would widen them (transformers' ``from_pretrained``, see
    ``core.transformers_loading``): the model is built with zero-stride placeholders in their place, then each
    such layer becomes a :class:`CastLinear` computing in ``compute`` whose weight stays in the file's fp8 and
    is cast, times its ``weight_scale``, per call (issue 17, fault 3). ``kept`` maps the model's
    ``<layer>.weight`` names to (fp8 tensor, scale). Returns how many layers keep fp8.
    """
    restored = 0
    for key, (tensor, scale) in kept.items():
        layer = model.get_submodule(key[: -len(".weight")])
        if not isinstance(layer, torch.nn.Linear) or tuple(layer.weight.shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: an fp8 weight of shape {tuple(tensor.shape)} does not fit {layer!r}")
        if type(layer) in PLAIN_LINEARS:
            layer.__class__ = CastLinear
        layer.compute_dtype = compute
        layer.weight = torch.nn.Parameter(tensor, requires_grad=False)
        layer.weight_scale = float(scale)
        if layer.bias is not None and layer.bias.dtype != compute:
            layer.bias.data = layer.bias.data.to(compute)
        restored += 1
    return restored
