"""fp32 linear layers on a CPU through oneDNN where it is faster than torch's default BLAS.

Why this exists: torch's x86 CPU wheels multiply fp32 matrices (``F.linear``, ``addmm``) with MKL's sgemm, and
MKL on non-Intel CPUs takes a generic code path. oneDNN, which every torch CPU build also carries (torch uses it
for bf16 matrix products, inductor for CPU linear layers), uses the CPU's AVX-512 units whoever made it. On this
project's development CPU (AMD EPYC with AVX-512, 2 threads) a FLUX.1 layer's product took 0.58-0.85 of MKL's
time (256-1024 rows; same fp32 arithmetic, results within 1e-6 of the largest output), and the matmuls are
about 95 % of a transformer call there (README "Benchmarks"). On Intel CPUs MKL is fast and the two should be
level (no Intel CPU was available to check), so ``auto`` measures once per process instead of guessing from the
vendor (:func:`calibrate`).

torch has no public switch that routes fp32 ``F.linear`` through oneDNN (``torch.backends.mkldnn`` covers
convolutions and reduced-precision matmuls only), so :func:`linear` calls ``torch.ops.mkldnn._linear_pointwise``
directly: the operator inductor emits for CPU linear layers, which takes dense tensors and returns a dense one
(no weight conversion, no second copy of the model). It is used only where it is known to pay:

* CPU tensors, fp32 input and weight, no autograd (training keeps ``F.linear``, which has the backward);
* not while ``torch.compile`` traces (``compile=on``): inductor lowers this operator only for weights it has
  frozen into constants, and chooses its own kernels for ``F.linear``;
* weights of at least :data:`MIN_WEIGHTS` elements: below about 1024x1024 oneDNN's per-call set-up costs more
  than it saves (measured: 4x slower for a 64x64 layer, level at 512x512), so tiny models are untouched;
* the backend is ``onednn``: ``EDITKIT_CPU_MATMUL`` = ``auto`` (default: :func:`calibrate` decides once per
  process), ``onednn`` or ``torch`` (always ``F.linear``), or :func:`set_backend` / :func:`using`.

Models get it through :func:`adopt` (``core.runtime.Component`` calls it for every model it wraps; it decides the
backend then): exact ``torch.nn.Linear`` layers become :class:`Linear`, which keeps the parameters and differs only in calling
:func:`linear`; EditKit's casting and GGUF layers call :func:`linear` themselves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

log = logging.getLogger("EditKit")

BACKENDS = ("auto", "onednn", "torch")
MIN_WEIGHTS = 1 << 20
ENV = "EDITKIT_CPU_MATMUL"
PAYS_BELOW = 0.9  # oneDNN is chosen when it takes less than this share of torch's time

_chosen: list[str | None] = [None]  # "onednn" / "torch" once decided
_lock = threading.Lock()


def available() -> bool:
    """Whether this torch build has oneDNN's linear operator."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def calibrate(rows: int = 256, width: int = 3072, repeats: int = 3) -> float:
    """oneDNN's time for one ``rows`` x ``width`` x ``width`` fp32 product as a share of ``F.linear``'s (best of
    ``repeats`` alternating pairs, after one warm-up each; about 0.3 s on a 2-core CPU). The default is a FLUX.1
    attention projection at a 256² picture's rows (0.66 on the benchmark CPU, where a 2048-wide one is 0.84:
    wider layers gain more, so the real layers' shape decides)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator)
    weight = torch.randn(width, width, generator=generator) * 0.02
    bias = torch.zeros(width)
    best = {"torch": float("inf"), "onednn": float("inf")}
    with torch.inference_mode():
        F.linear(x, weight, bias)
        _onednn(x, weight, bias)
        for _ in range(repeats):
            for name, run in (("torch", F.linear), ("onednn", _onednn)):
                start = time.perf_counter()
                run(x, weight, bias)
                best[name] = min(best[name], time.perf_counter() - start)
    return best["onednn"] / best["torch"]


def backend() -> str:
    """``onednn`` or ``torch``: the environment's choice, else what :func:`calibrate` says on this CPU."""
    chosen = _chosen[0]
    if chosen is not None:
        return chosen
    with _lock:
        if _chosen[0] is None:
            _chosen[0] = _decide()
        return _chosen[0]


def _decide() -> str:
    wanted = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if wanted not in BACKENDS:
        log.warning("EditKit: %s=%r is not one of %s; using auto.", ENV, wanted, ", ".join(BACKENDS))
        wanted = "auto"
    if wanted == "torch" or not available():
        return "torch"
    if wanted == "onednn":
        return "onednn"
    try:
        share = calibrate()
    except (RuntimeError, NotImplementedError) as exc:  # an operator this build lacks at run time
        log.info("EditKit: oneDNN linear layers unavailable (%s); CPU products use torch's default.", exc)
        return "torch"
    choice = "onednn" if share < PAYS_BELOW else "torch"
    log.info("EditKit: fp32 CPU products through %s (oneDNN took %.2f of torch's default time on this CPU).",
             "oneDNN" if choice == "onednn" else "torch's default BLAS", share)
    return choice


def set_backend(name: str | None) -> None:
    """Force ``onednn`` / ``torch``, or ``None`` to decide again from the environment at the next product."""
    if name not in (None, "onednn", "torch"):
        raise ValueError(f"backend must be 'onednn', 'torch' or None, not {name!r}")
    if name == "onednn" and not available():
        raise RuntimeError("this torch build has no oneDNN linear operator (torch.ops.mkldnn._linear_pointwise)")
    with _lock:
        _chosen[0] = name


@contextmanager
def using(name: str):
    """Run a block with ``name``'s products (benchmarks compare the two in one process)."""
    before = _chosen[0]
    set_backend(name)
    try:
        yield
    finally:
        with _lock:
            _chosen[0] = before


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where that is faster (see the module docstring)."""
    if (x.device.type == "cpu" and weight.dtype == torch.float32 and x.dtype == torch.float32
            and weight.numel() >= MIN_WEIGHTS and weight.device.type == "cpu" and x.numel()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and (bias is None or bias.dtype == torch.float32)
            and not torch.compiler.is_compiling()  # inductor lowers this operator only for frozen weights
            and backend() == "onednn"):
        return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` whose product goes through :func:`linear`; same parameters, same arithmetic.

    Follows ComfyUI's cast protocol as EditKit's other layers do: a weight on another device than the input, or
    ``weight_function``/``bias_function`` set by ComfyUI's memory manager (low-VRAM streaming, LoRA patches), is
    brought to the input's device and dtype first, as ComfyUI's own cast layers do.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight.device != x.device or getattr(self, "weight_function", None) or getattr(self, "bias_function", None):
            from .precision import cast_weight_bias  # (precision imports this module)

            weight, bias = cast_weight_bias(self, x.dtype, x.device)
        return linear(x, weight, bias)


def adopt(module: torch.nn.Module) -> int:
    """Make every exact ``torch.nn.Linear`` in ``module`` a :class:`Linear` (in place; idempotent) where the
    backend is oneDNN; elsewhere (``torch``: Intel CPUs, ``EDITKIT_CPU_MATMUL=torch``) nothing changes. Returns how
    many layers changed. Subclasses (EditKit's cast and GGUF layers, ComfyUI's) are left alone. A model that
    ComfyUI runs on a GPU gets ComfyUI's own Linear for these layers again (``nodes/comfy_bridge.py``)."""
    if backend() != "onednn":
        return 0
    changed = 0
    for layer in module.modules():
        if type(layer) is torch.nn.Linear:
            layer.__class__ = Linear
            changed += 1
    return changed
