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

    * dequantizes straight into the compute dtype, bit-identical to gguf-py's reference rounded once
      (:func:`dequantize`: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K decoded a cache-sized chunk at a
      time, about 1-2 ns per weight on one core of the benchmark CPU against 10-25 ns for diffusers' block
      decoders, which remain for the rarer types); a weight that is not kept is decoded into a reused
      CPU buffer instead of fresh memory;
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

import contextlib
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.quantizers.gguf.utils import GGUFLinear as _DiffusersGGUFLinear
from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_functions

from .errors import ModelFileError
from .matmul import linear

log = logging.getLogger("EditKit")

_CHUNK_ELEMENTS = 1 << 20  # dequantized elements per CPU chunk (4 MiB in fp32: fits the L2/L3 caches)
_CACHE_MIN_ROWS = 16  # activations with fewer rows are cheaper through the chunked path than cached weights
_Q8_0 = 8  # gguf.GGMLQuantizationType.Q8_0
_DECODE_CHUNK_ELEMENTS = 1 << 18  # weights decoded per step on a CPU (the byte temporaries stay in L2)
_DEVICE_CHUNK_ELEMENTS = 1 << 22  # and on a GPU
_BIT_SHIFTS = torch.arange(8, dtype=torch.int32)
_CRUMB_SHIFTS = torch.arange(0, 8, 2, dtype=torch.int32)
_LANE_BITS = 0x8040201008040201 - (1 << 64)  # lane k (byte k of a 64-bit word) keeps bit k; as a signed int64
DECODE_THREADS = 1
"""CPU threads that decode GGUF weights (and run the few-row chunked matmuls); 0: as many as torch uses.

Decoding is a string of short element-wise operations (a cache-sized chunk each, about ten per chunk, over a
thousand per large layer). With several threads each operation ends at a barrier where every thread must
arrive; when the machine runs more processes than cores, a descheduled thread holds the others at every
barrier for a time slice, which made 2-thread GGUF calls 1.6-4x slower than dense on a busy 2-core box
(README Benchmarks). One thread has no barrier, and costs little when quiet: decoding Q8_0 on one core is
0.45 ns per weight, about 2 % of a 1,536-row matmul with that weight on two. The matmuls themselves keep every
thread. ``scripts/bench`` ``gguf:calls`` measures both settings in one process. torch's thread count is
process-wide, so for the moment a layer decodes, torch work on another Python thread also runs on one thread
(ComfyUI samples on one worker thread, so nothing else computes then); it is restored right after.
"""
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


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 at byte ``offset`` of every block, as an ``[n, 1]`` fp32 column (exact)."""
    return blocks[:, offset:offset + 2].view(torch.float16).float()


def _words(packed: torch.Tensor) -> torch.Tensor:
    """Contiguous bytes ``[..., 4 k]`` viewed as ``[..., k]`` int32 words (copied when not 4-byte aligned)."""
    packed = packed.contiguous()
    if packed.storage_offset() % 4:
        packed = packed.clone()
    return packed.view(torch.int32)


def _nibbles(packed: torch.Tensor, work: torch.Tensor, high: torch.Tensor | None = None) -> torch.Tensor:
    """``packed`` ``[n, k, w]`` bytes → ``work`` ``[n, k, 2, w]`` fp32: low nibbles, then high nibbles (GGML's
    order), each ORed with ``high`` (``[n, k, 2, w]`` bytes, the fifth/sixth bits already in place) when given.

    The bit work runs on 32-bit words (four bytes per operation; the masks keep every bit in its byte) and
    writes both halves into one byte buffer in the elements' order, so one contiguous conversion fills ``work``.
    """
    n, k, w = packed.shape
    words = _words(packed)  # [n, k, w / 4]
    both = torch.empty(n, k, 2, w // 4, dtype=torch.int32, device=packed.device)
    torch.bitwise_and(words, 0x0F0F0F0F, out=both[:, :, 0])
    torch.bitwise_right_shift(words, 4, out=both[:, :, 1])
    both[:, :, 1].bitwise_and_(0x0F0F0F0F)
    values = both.view(torch.uint8)  # [n, k, 2, w]
    if high is not None:
        values.bitwise_or_(high)
    return work.copy_(values)


def _bit_planes(packed: torch.Tensor, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """Bit fields of every byte of ``packed`` ``[n, b]`` (b a multiple of 4), moved to bits 4 and up.

    Result ``[n, len(shifts), b]`` bytes: entry ``[i, j]`` is ``(byte j >> shifts[i]) & mask``, shifted left
    by 4. Computed on 32-bit words (four bytes per operation; ``mask`` is repeated in each byte, so no bit
    crosses into the next byte), a quarter of the operations of byte-wise shifts.
    """
    words = _words(packed).unsqueeze(1)  # [n, 1, b / 4]
    planes = torch.bitwise_right_shift(words, shifts.to(packed.device).view(1, -1, 1))
    planes.bitwise_and_(mask * 0x01010101).bitwise_left_shift_(4)
    return planes.view(torch.uint8)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 packed bytes → 8 six-bit scales and 8 six-bit minimums per super-block (GGML's layout)."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _decode_q8_0(blocks, work):
    work.copy_(blocks[:, 2:].view(torch.int8)).mul_(_f16(blocks, 0))


def _decode_q4_0(blocks, work):
    n = blocks.shape[0]
    _nibbles(blocks[:, 2:].unsqueeze(1), work.view(n, 1, 2, 16))
    work.sub_(8).mul_(_f16(blocks, 0))  # (two in-place passes beat one broadcasting addcmul here)


def _decode_q4_1(blocks, work):
    n = blocks.shape[0]
    _nibbles(blocks[:, 4:].unsqueeze(1), work.view(n, 1, 2, 16))
    work.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))  # q d (exact) + m, rounded once


def _decode_q5_0(blocks, work):
    n = blocks.shape[0]
    _nibbles(blocks[:, 6:].unsqueeze(1), work.view(n, 1, 2, 16), _q5_high(blocks[:, 2:6]))
    work.sub_(16).mul_(_f16(blocks, 0))


def _decode_q5_1(blocks, work):
    n = blocks.shape[0]
    _nibbles(blocks[:, 8:].unsqueeze(1), work.view(n, 1, 2, 16), _q5_high(blocks[:, 4:8]))
    work.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's 32-bit field (bit j: fifth bit of element j) → ``[n, 1, 2, 16]`` bytes of 0 or 16.

    Each byte is spread over the 8 bytes of a 64-bit word without leaving the word's lanes: the byte
    repeated in every lane, lane k keeps bit k, a nonzero lane becomes 16 (adding 0x7F sets a lane's top
    bit exactly when it is nonzero, and never carries into the next lane). So the bits come out in the
    elements' order, 8 at a time.
    """
    lanes = qh.to(torch.int64).mul_(0x0101010101010101).bitwise_and_(_LANE_BITS)
    lanes.add_(0x7F7F7F7F7F7F7F7F).bitwise_right_shift_(3).bitwise_and_(0x1010101010101010)
    return lanes.view(torch.uint8).view(qh.shape[0], 1, 2, 16)


def _decode_k(blocks, work, high: bool):
    """Q4_K (``high`` False) and Q5_K: 8 sub-blocks of 32 with six-bit scales and minimums."""
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * sc).unsqueeze(-1)  # the reference's rounding order: (d * sc) * q - dmin * m
    low = (_f16(blocks, 2) * mn).unsqueeze(-1)
    # Q5_K: bit s of qh byte j is the fifth bit of element j of sub-block s
    fifth = _bit_planes(blocks[:, 16:48], _BIT_SHIFTS, 1).view(n, 4, 2, 32) if high else None
    _nibbles((blocks[:, 48:] if high else blocks[:, 16:]).reshape(n, 4, 32), work.view(n, 4, 2, 32), fifth)
    work.view(n, 8, 32).mul_(scale).sub_(low)  # q (d sc) (exact) - dmin m, rounded once


def _decode_q6_k(blocks, work):
    n = blocks.shape[0]
    scale = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8)).unsqueeze(-1)  # [n, 16, 1]
    crumbs = _bit_planes(blocks[:, 128:192].reshape(n * 2, 32), _CRUMB_SHIFTS, 3)  # [2n, 4, 32]: bits 4-5
    _nibbles(blocks[:, :128].reshape(n, 2, 64), work.view(n, 2, 2, 64), crumbs.view(n, 2, 2, 64))
    work.sub_(32).view(n, 16, 16).mul_(scale)


_DECODERS = {  # gguf.GGMLQuantizationType values → decoders writing one chunk of blocks into ``out``
    8: _decode_q8_0, 2: _decode_q4_0, 3: _decode_q4_1, 6: _decode_q5_0, 7: _decode_q5_1,
    12: lambda blocks, out: _decode_k(blocks, out, high=False), 13: lambda blocks, out: _decode_k(blocks, out, high=True),
    14: _decode_q6_k,
}


@contextlib.contextmanager
def decode_threads(device: torch.device):
    """Run the block with :data:`DECODE_THREADS` CPU threads (nothing changes on a GPU or when nested)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or DECODE_THREADS <= 0 or DECODE_THREADS >= threads:
        yield
        return
    torch.set_num_threads(DECODE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dequantize(raw: torch.Tensor, quant_type, shape: tuple[int, int], dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed GGUF bytes ``raw`` (rows of blocks) → a ``shape`` tensor in ``dtype`` (:func:`_dequantize`), on a CPU
    with :data:`DECODE_THREADS` threads (see there why)."""
    with decode_threads(raw.device):
        return _dequantize(raw, quant_type, shape, dtype, out)


def _dequantize(raw: torch.Tensor, quant_type, shape: tuple[int, int], dtype: torch.dtype,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The decoding itself, on ``raw``'s device.

    Equal to gguf-py's reference dequantization (``gguf.quants.dequantize``) rounded once to ``dtype``:
    every value is computed in fp32 in the reference's order of operations and rounded as it is stored.
    Why not diffusers' block decoders (still used for the rarer types): they make about ten full-size
    temporaries (int32 bit fields, fp32 products) and then convert, 25 ns per weight for Q5_1 or Q4_K
    on the benchmark CPU, more than a 1,500-token matmul's share per weight. Here the blocks are
    decoded a cache-sized chunk at a time; the bit work runs on bytes and the scale is applied by one
    mixed-dtype multiply (or multiply-add) that writes the result straight into ``out`` in ``dtype``,
    so no fp32 copy of the weight exists when ``dtype`` is bf16 (measured: docs/precision-and-gguf.md).
    """
    import gguf

    rows, cols = shape
    raw = _plain(raw)
    block_size, type_size = gguf.GGML_QUANT_SIZES[quant_type]
    blocks = raw.reshape(-1, type_size)
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=raw.device)
    flat = out.view(-1, block_size)
    decoder = _DECODERS.get(int(quant_type))
    n = blocks.shape[0]
    # CPUs: chunks that stay in the core's cache; GPUs: larger ones (fewer launches), still far below a
    # large layer, so the fp32 temporary is at most 16 MiB there too
    chunk = _DECODE_CHUNK_ELEMENTS if raw.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    step = max(1, chunk // block_size)
    if decoder is not None and blocks.storage_offset() % 2 == 0:  # (fp16 fields at odd offsets: generic path)
        work = torch.empty(min(step, n), block_size, device=raw.device)  # fp32, reused for every chunk
        for start in range(0, n, step):
            target = flat[start:start + step]
            chunk = work[:target.shape[0]]
            decoder(blocks[start:start + step], chunk)
            target.copy_(chunk)
        return out.view(rows, cols)
    for start in range(0, blocks.shape[0], step):
        values = dequantize_functions[quant_type](blocks[start:start + step], block_size, type_size,
                                                  dtype=torch.float32)
        flat[start:start + step].copy_(values.reshape(-1, block_size))
    return out.view(rows, cols)


def dequantize_parameter(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A whole ``GGUFParameter`` as a dense ``dtype`` tensor of its logical shape."""
    shape = tuple(weight.quant_shape)
    flat = (int(torch.tensor(shape[:-1]).prod()) if len(shape) > 1 else 1, shape[-1])
    return dequantize(weight, weight.quant_type, flat, dtype).reshape(shape)


# --------------------------------------------------------------------------------------
# Dequantized-layer cache


class DequantCache:
    """Dequantized weights of one model's GGUF layers (or widened weights of its cast layers, core.precision),
    kept within a byte budget.

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

    def offer(self, layer: torch.nn.Module, weight, rows: int, size: int | None = None) -> None:
        """Keep ``weight`` (what the layer computes with: a tensor, or core.precision's (weight, bias) pair) as
        ``layer._dense`` if ``size`` bytes (default: the tensor's) fit and ``rows`` reach the layer's
        ``cache_min_rows``."""
        if rows < layer.cache_min_rows:
            return
        if size is None:
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
        release_scratch()

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


_scratch_buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}
_scratch_lock = threading.Lock()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A CPU buffer of at least ``numel`` elements of ``dtype``, reused by every uncached layer of this
    thread (each weight decoded into it is consumed by its matmul before the next layer runs). It holds
    the largest such weight seen until :func:`release_scratch` (a GGUF model's cache is cleared or the model
    is collected), so nothing of a freed model stays behind."""
    key = (threading.get_ident(), dtype)
    with _scratch_lock:
        buffer = _scratch_buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
                buffer = _scratch_buffers[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def release_scratch() -> None:
    """Drop the decode buffers (a layer running right now keeps its own reference until its matmul ends)."""
    with _scratch_lock:
        _scratch_buffers.clear()


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

    @property
    def cache_min_rows(self) -> int:
        """Fewest activation rows for which a decoded weight is worth keeping (see :class:`DequantCache`)."""
        return _CACHE_MIN_ROWS if self.weight.quant_type == _Q8_0 else 1

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
            return linear(x, dense, bias)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        cache = self.dequant_cache
        min_rows = self.cache_min_rows  # slower decoders: cache all
        size = self.out_features * self.in_features * dtype.itemsize
        wants_cache = (cache is not None and not weight_functions and rows >= min_rows
                       and cache.used + size <= cache.budget)
        chunkable = not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
        if (x.device.type == "cpu" and chunkable and not weight_functions and not wants_cache
                and rows <= _CHUNKED_MAX_ROWS):
            return self._chunked(x, dtype, bias)
        if x.device.type == "cpu" and chunkable and not weight_functions and not wants_cache:
            # consumed at once and never kept: decode into a reused buffer (a fresh one of this size comes
            # from mmap and pays a page fault per 4 KiB, as much as decoding Q8_0)
            raw = _plain(self.weight).to(x.device)
            weight = dequantize(raw, self.weight.quant_type, (self.out_features, self.in_features), dtype,
                                out=_scratch(self.out_features * self.in_features, dtype))
            return linear(x, weight, bias)
        weight = _apply(self.dense_weight(dtype, x.device), weight_functions)
        if wants_cache:
            cache.offer(self, weight, rows)
        return linear(x, weight, bias)

    def _chunked(self, x: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
        """CPU matmul over row chunks of the weight, each dequantized into a cache-sized buffer.

        At most 64 activation rows: each chunk's matmul is as short as its decoding, so the whole layer runs on
        :data:`DECODE_THREADS` threads (no barrier per short operation)."""
        with decode_threads(x.device):
            return self._chunked_rows(x, dtype, bias)

    def _chunked_rows(self, x: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
        raw = _plain(self.weight)
        if raw.device != x.device:
            raw = raw.to(x.device)
        n_out, n_in = self.out_features, self.in_features
        flat = x.reshape(-1, n_in)
        step = max(16, _CHUNK_ELEMENTS // max(n_in, 1))
        if step >= n_out:
            weight = dequantize(raw, self.weight.quant_type, (n_out, n_in), dtype)
            return linear(x, weight, bias)
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
    if cache is not None:
        weakref.finalize(module, release_scratch)  # the decode buffer is sized for this model's layers
    return cache


def quantized_bytes(module: torch.nn.Module) -> int:
    """Bytes held by the packed GGUF weights of ``module``."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if hasattr(p, "quant_type"))
