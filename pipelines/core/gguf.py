"""GGUF weights that stay quantized: the file mapped (not copied), layers that dequantize fast where they run.

Reading (:func:`read_gguf`)
    gguf-py's ``GGUFReader`` maps the file; every tensor is a view of that mapping, wrapped in
    diffusers' ``GGUFParameter`` (which carries the quantization type through key conversions and
    into diffusers' GGUF model loading, so every family's ``from_single_file`` path works unchanged).
    diffusers' own ``load_gguf_checkpoint`` copies each tensor out of the mapping, so a load needed
    twice the file in RAM; mapped, the weights cost nothing until a layer first reads them, and pages
    the kernel may drop again (they are file-backed) under memory pressure. The mapping is *private
    copy-on-write*: tensors are writable without ever writing to the file.

    Replacing the file on disk: a file replaced by a new one (download tools, ``mv``, ``cp`` to a new
    name then rename; anything that makes a new inode) leaves the loaded model intact, because the
    mapping keeps the old file alive; the loader's change detection (size, mtime) reloads the new file
    on the next run. A file overwritten *in place* (same inode) would feed the running model a mix of
    old and new bytes, so :func:`watch` remembers the inode's size and mtime and the runtime refuses to
    use the model once they change (a clear error asking to run again, which reloads). A file
    truncated in place while a step is running can still end the process (SIGBUS), as with every
    memory-mapped loader (ComfyUI's safetensors and ComfyUI-GGUF alike).

Computing (:class:`GGUFLinear`)
    Why EditKit's own layer instead of diffusers' ``GGUFLinear``: diffusers dequantizes a Q8_0 weight
    through float16 intermediates in three full passes and then converts to the compute dtype (a
    full FLUX.1 pass took 2.3-2.6 s per step on the benchmark CPU, +30 % per step), and its layer
    cannot be streamed by ComfyUI under ``--lowvram``. This layer

    * dequantizes straight into the compute dtype: Q8_0 is one int8→float conversion into the output
      buffer plus one in-place scale multiply (bit-identical to gguf-py's reference dequantization in
      fp32); the other types use diffusers' block decoders in fp32;
    * on a CPU, for activations of a few rows (modulation layers, which see one vector per image),
      multiplies chunk by chunk (a few hundred output rows at a time, dequantized into a cache-sized
      buffer and consumed at once by the matmul), so the dense weight never travels through main
      memory: such a layer then costs about 2x its dense matvec instead of 10x; for many rows one
      full dequantization and one large matmul is faster (measured, docs/precision-and-gguf.md);
    * keeps dequantized copies of layers in a :class:`DequantCache` while the host says memory is
      free (the runtime sets its budget at every acquire; ComfyUI's bridge empties it whenever the
      memory manager unloads the model), so later steps skip dequantization;
    * runs wherever its input is: quantized bytes left on the CPU (ComfyUI's partial loads) are
      copied to the input's device and dequantized there, and ComfyUI's ``weight_function`` /
      ``bias_function`` are applied to the dequantized weight as ComfyUI's own cast layers do.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.quantizers.gguf.utils import GGUFLinear as _DiffusersGGUFLinear
from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_functions

from .errors import ModelFileError

log = logging.getLogger("EditKit")

_CHUNK_ELEMENTS = 1 << 20  # dequantized elements per CPU chunk (4 MiB in fp32: fits the L2/L3 caches)
_CACHE_MIN_ROWS = 16  # activations with fewer rows are cheaper through the chunked path than cached weights
_Q8_0 = 8  # gguf.GGMLQuantizationType.Q8_0
_CHUNKED_MAX_ROWS = 64  # above this, one full dequantization then one large matmul is faster on a CPU


# --------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class FileIdentity:
    """What identifies the bytes behind a mapping: the inode and its size and modification time."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> FileIdentity:
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class MappedFile:
    """An open handle on a mapped file, to notice when its inode is rewritten in place."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self.identity = FileIdentity.of(os.fstat(self._fd))

    def changed_in_place(self) -> bool:
        return FileIdentity.of(os.fstat(self._fd)) != self.identity

    def check(self) -> None:
        if self.changed_in_place():
            raise ModelFileError(
                self.path, "The file was overwritten on disk while its model was loaded, so its weights can no longer "
                "be trusted", "an unchanged file: run the workflow again and the loader reads the new file (replace "
                "model files by moving a new file into place, not by overwriting them, to keep running models intact)")


def read_gguf(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.gguf`` file as views of a private mapping (see the module docstring).

    Quantized tensors (every type but F32/F16) are ``GGUFParameter`` of packed bytes, exactly the
    tensors diffusers' ``load_gguf_checkpoint`` returns, without its copy.
    """
    import gguf

    reader = gguf.GGUFReader(str(path), mode="c")
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        data = torch.from_numpy(tensor.data)
        if tensor.tensor_type in plain:
            tensors[tensor.name] = data
            continue
        if tensor.tensor_type not in dequantize_functions:
            raise ValueError(f"tensor {tensor.name} uses the GGUF type {tensor.tensor_type.name}, which EditKit cannot "
                             f"read (it reads {', '.join(t.name for t in dequantize_functions)})")
        tensors[tensor.name] = GGUFParameter(data, quant_type=tensor.tensor_type)
    return tensors


# --------------------------------------------------------------------------------------
# Dequantization


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes without the GGUFParameter subclass (whose per-op wrapping costs time)."""
    if type(tensor) is torch.Tensor:
        return tensor
    return torch.Tensor._make_subclass(torch.Tensor, tensor, False)


def _q8_0(raw: torch.Tensor, rows: int, cols: int, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """Q8_0 blocks (fp16 scale + 32 int8) → ``[rows, cols]``: one conversion into ``out``, one in-place scale."""
    blocks = raw.reshape(rows, cols // 32, 34)
    values = blocks[..., 2:].view(torch.int8)
    scales = blocks[..., :2].view(torch.float16).float()
    work = out if out is not None and dtype == torch.float32 else torch.empty(
        (rows, cols // 32, 32), dtype=torch.float32, device=raw.device)
    work = work.view(rows, cols // 32, 32)
    work.copy_(values)
    work.mul_(scales)
    if dtype != torch.float32:
        if out is not None:
            return out.view(rows, cols // 32, 32).copy_(work).view(rows, cols)
        return work.to(dtype).view(rows, cols)
    return work.view(rows, cols)


def dequantize(raw: torch.Tensor, quant_type, shape: tuple[int, int], dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed GGUF bytes ``raw`` (rows of blocks) → a ``shape`` tensor in ``dtype`` on ``raw``'s device.

    Computed in fp32 and rounded once to ``dtype`` (never through fp16 intermediates), so fp32 results
    equal gguf-py's reference dequantization.
    """
    import gguf

    rows, cols = shape
    raw = _plain(raw)
    if quant_type == gguf.GGMLQuantizationType.Q8_0:
        try:
            return _q8_0(raw, rows, cols, dtype, out)
        except RuntimeError:  # scale bytes at an odd offset cannot be viewed as fp16: use the generic decoder
            pass
    block_size, type_size = gguf.GGML_QUANT_SIZES[quant_type]
    blocks = raw.reshape(-1, type_size)
    values = dequantize_functions[quant_type](blocks, block_size, type_size, dtype=torch.float32)
    values = values.reshape(rows, cols)
    if out is not None:
        return out.view(rows, cols).copy_(values)
    return values.to(dtype)


def dequantize_parameter(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A whole ``GGUFParameter`` as a dense ``dtype`` tensor of its logical shape."""
    shape = tuple(weight.quant_shape)
    flat = (int(torch.tensor(shape[:-1]).prod()) if len(shape) > 1 else 1, shape[-1])
    return dequantize(weight, weight.quant_type, flat, dtype).reshape(shape)


# --------------------------------------------------------------------------------------
# Dequantized-layer cache


class DequantCache:
    """Dequantized weights of one model's GGUF layers, kept within a byte budget.

    The host sets :attr:`budget` whenever it places the model (free memory it is willing to lend)
    and calls :meth:`clear` when its memory manager takes the memory back. Layers offer their freshly
    dequantized weight after use; it is kept if it fits, in call order. Q8_0 layers that see only a
    handful of activation rows (modulation layers, batch-sized inputs) are not cached: the chunked
    CPU path costs them about as much as a cached dense weight would; other types decode slowly
    enough that every layer is worth caching.
    """

    def __init__(self):
        self.budget = 0
        self.used = 0
        self._layers: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def set_budget(self, budget: int) -> None:
        self.budget = max(0, int(budget))
        if self.used > self.budget:
            self.clear()

    def offer(self, layer: GGUFLinear, weight: torch.Tensor, rows: int) -> None:
        if rows < (_CACHE_MIN_ROWS if layer.weight.quant_type == _Q8_0 else 1):
            return
        size = weight.numel() * weight.element_size()
        with self._lock:
            if self.used + size > self.budget:
                return
            self.used += size
            self._layers.add(layer)
        layer._dense = weight

    def clear(self) -> None:
        """Drop every cached weight (the memory returns to the allocator as soon as no call holds it)."""
        with self._lock:
            for layer in list(self._layers):
                layer._dense = None
            self._layers = weakref.WeakSet()
            self.used = 0

    @property
    def layers(self) -> int:
        return len(self._layers)


def cache_budget_from_env(free_bytes: int) -> int:
    """The cache budget for ``free_bytes`` of free memory, following ``EDITKIT_GGUF_CACHE``.

    ``auto`` (default): half of the free memory; ``off`` (or 0): none; a number: that many MiB at most.
    """
    setting = os.environ.get("EDITKIT_GGUF_CACHE", "auto").strip().lower()
    if setting in ("", "auto"):
        return max(0, free_bytes // 2)
    if setting in ("off", "0", "none", "false"):
        return 0
    try:
        return max(0, min(free_bytes, int(float(setting) * 2**20)))
    except ValueError:
        log.warning("EditKit: EDITKIT_GGUF_CACHE=%r is neither auto, off nor a size in MiB; using auto", setting)
        return max(0, free_bytes // 2)


def free_memory(device: torch.device) -> int:
    """Memory free on ``device`` without a host memory manager (CPU: MemAvailable; CUDA: free VRAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 0
    return 0


# --------------------------------------------------------------------------------------
# The layer


def _apply(tensor: torch.Tensor, functions) -> torch.Tensor:
    for function in functions:
        tensor = function(tensor)
    return tensor


class GGUFLinear(_DiffusersGGUFLinear):
    """A linear layer over quantized GGUF bytes; see the module docstring for what it does differently.

    Same parameters as diffusers' ``GGUFLinear`` (``weight`` a ``GGUFParameter``, ``bias`` dense,
    ``compute_dtype``), so diffusers' loading builds it and :func:`adopt_gguf_layers` swaps the class.
    """

    _dense: torch.Tensor | None = None
    dequant_cache: DequantCache | None = None

    def dense_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        raw = _plain(self.weight)
        if raw.device != device:
            raw = raw.to(device, non_blocking=True)
        return dequantize(raw, self.weight.quant_type, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        bias = self.bias
        if bias is not None:
            bias = bias.to(device=x.device, dtype=dtype, non_blocking=True)
            bias = _apply(bias, getattr(self, "bias_function", ()))
        weight_functions = getattr(self, "weight_function", ())
        dense = self._dense
        if dense is not None and not weight_functions and dense.dtype == dtype and dense.device == x.device:
            return F.linear(x, dense, bias)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        cache = self.dequant_cache
        min_rows = _CACHE_MIN_ROWS if self.weight.quant_type == _Q8_0 else 1  # slower decoders: cache all
        wants_cache = (cache is not None and not weight_functions and rows >= min_rows
                       and cache.used < cache.budget)
        chunkable = not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
        if (x.device.type == "cpu" and chunkable and not weight_functions and not wants_cache
                and rows <= _CHUNKED_MAX_ROWS):
            return self._chunked(x, dtype, bias)
        weight = _apply(self.dense_weight(dtype, x.device), weight_functions)
        if wants_cache:
            cache.offer(self, weight, rows)
        return F.linear(x, weight, bias)

    def _chunked(self, x: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
        """CPU matmul over row chunks of the weight, each dequantized into a cache-sized buffer."""
        raw = _plain(self.weight)
        if raw.device != x.device:
            raw = raw.to(x.device)
        n_out, n_in = self.out_features, self.in_features
        flat = x.reshape(-1, n_in)
        step = max(16, _CHUNK_ELEMENTS // max(n_in, 1))
        if step >= n_out:
            weight = dequantize(raw, self.weight.quant_type, (n_out, n_in), dtype)
            return F.linear(x, weight, bias)
        out = torch.empty(flat.shape[0], n_out, dtype=dtype, device=x.device)
        buffer = torch.empty(step * n_in, dtype=dtype, device=x.device)
        row_bytes = raw.shape[-1]
        packed = raw.reshape(n_out, row_bytes)
        for start in range(0, n_out, step):
            stop = min(n_out, start + step)
            weight = dequantize(packed[start:stop], self.weight.quant_type, (stop - start, n_in), dtype,
                                out=buffer[: (stop - start) * n_in])
            if bias is None:
                torch.mm(flat, weight.t(), out=out[:, start:stop])
            else:
                torch.addmm(bias[start:stop], flat, weight.t(), out=out[:, start:stop])
        return out.reshape(*x.shape[:-1], n_out)


def adopt_gguf_layers(module: torch.nn.Module) -> DequantCache | None:
    """Turn diffusers' GGUF layers in ``module`` into :class:`GGUFLinear` sharing one :class:`DequantCache`.

    Returns the cache, or None when ``module`` has no GGUF layer. Idempotent.
    """
    cache = None
    for layer in module.modules():
        if isinstance(layer, _DiffusersGGUFLinear):
            if type(layer) is _DiffusersGGUFLinear:
                layer.__class__ = GGUFLinear
            if isinstance(layer, GGUFLinear):
                if layer.dequant_cache is None:
                    cache = cache or DequantCache()
                    layer.dequant_cache = cache
                cache = layer.dequant_cache
    return cache


def quantized_bytes(module: torch.nn.Module) -> int:
    """Bytes held by the packed GGUF weights of ``module``."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if hasattr(p, "quant_type"))
