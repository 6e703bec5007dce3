"""Regional compilation: ``torch.compile`` on a transformer's repeated block classes, compiled once and reused.

diffusers' ``ModelMixin.compile_repeated_blocks`` compiles every module whose class is listed in the
model's ``_repeated_blocks`` (FLUX.1: the double and single blocks; Qwen-Image and Z-Image: their one
block class). All blocks of a class share one compiled graph, so compiling costs about one block per
class however deep the model is, instead of the whole model. The first call after compiling holds
the compilation (logged with its time); later calls reuse the graph until an input's shape changes
(a new picture size compiles once more, then shapes are treated as dynamic).

Settings (the ``compile`` input of every loader node):

``off``  never compile.
``on``   compile wherever the model class declares repeated blocks.
``auto`` compile only where it is expected to pay (:func:`pays_on`): CUDA devices with dense weights
         (untested on a GPU so far: no GPU was available to the project). On this project's 2-core CPU it
         does not pay: at 4+8 FLUX.1 blocks (real width, 256²) compiled blocks ran a Fill step at 0.97 of
         diffusers' time where eager EditKit ran it at 0.75, because eager EditKit multiplies through oneDNN
         (core.matmul) while inductor picks its own GEMM for un-frozen weights; earlier, with torch's default
         products on both, compiled and eager were level at that depth (the matmuls are about 95 % of a call,
         and compiling fuses only the rest). The first compilation also takes about a minute per picture
         size. GGUF layers (quantized weights behind a custom layer) stay eager under ``auto``.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("EditKit")

COMPILE_CHOICES = ("off", "auto", "on")
COMPILE_TOOLTIP = (
    "Compile the transformer's repeated blocks with torch.compile (regional compilation: one compiled "
    "block reused by every block of its kind). off: never. on: always (the first run takes longer, "
    "logged; later runs reuse it). auto: a CUDA GPU with dense weights only (on a CPU compiled blocks were "
    "slower than EditKit's eager ones and compiling takes about a minute per picture size; GGUF stays uncompiled)."
)


def pays_on(device: torch.device, quantized: bool) -> bool:
    """Whether ``auto`` compiles: measured per device kind (README "Benchmarks")."""
    return torch.device(device).type == "cuda" and not quantized


def check_setting(setting: str) -> str:
    if setting not in COMPILE_CHOICES:
        from .errors import EditKitError

        raise EditKitError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, not {setting!r}.")
    return setting


def apply(component, setting: str, device: torch.device | str | None = None) -> bool:
    """Compile ``component``'s repeated blocks per ``setting`` (in place); returns whether it did.

    Idempotent: a module is compiled at most once. The first call of the compiled module is timed and
    logged, because that is when torch.compile really compiles.
    """
    check_setting(setting)
    module = component.module
    if setting == "off":
        return False
    if getattr(module, "_editkit_compiled", False):
        return True
    device = torch.device(device) if device is not None else component.device
    if setting == "auto" and not pays_on(device, component.quantized):
        return False
    blocks = getattr(module, "_repeated_blocks", None)
    if not blocks or not hasattr(module, "compile_repeated_blocks"):
        log.info("EditKit: %s has no repeated blocks declared; compile=%s leaves it uncompiled.",
                 type(module).__name__, setting)
        return False
    module.compile_repeated_blocks()
    module._editkit_compiled = True
    _log_first_call(module, component.name, blocks)
    return True


def _log_first_call(module: torch.nn.Module, name: str, blocks) -> None:
    """Log how long the first call takes (the compilation), once."""
    def before(_module, _args, _kwargs):
        module._editkit_compile_started = time.perf_counter()

    def after(_module, _args, _kwargs, _output):
        seconds = time.perf_counter() - module.__dict__.pop("_editkit_compile_started", time.perf_counter())
        log.info("EditKit: first call of '%s' with compiled %s took %.1f s (compilation included).",
                 name, ", ".join(blocks), seconds)
        handles[0].remove()
        handles[1].remove()

    handles = (module.register_forward_pre_hook(before, with_kwargs=True),
               module.register_forward_hook(after, with_kwargs=True))
