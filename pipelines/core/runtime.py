"""The seam between the torch work and its host (ComfyUI or a plain Python process).

Pipelines receive a :class:`Runtime` and call it to place a model on the compute device
before using it (:meth:`Runtime.acquire`), to report progress with an optional preview, and
to check for interruption once per step. ``nodes.comfy_bridge.ComfyRuntime`` implements this
with ComfyUI's memory manager, ProgressBar and interrupt flag; :class:`TorchRuntime` is the
fallback used by tests, the smoke command, the benchmarks and the training CLI.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import Interrupted
from .heap import trim_when_collected

PreviewFn = Callable[[], torch.Tensor]


@dataclass(eq=False)
class Component:
    """A loaded model plus what a host needs to manage it.

    ``kind`` chooses the ComfyUI device policy: ``"diffusion"`` and ``"segmentation"`` run on
    the main device, ``"text_encoder"`` follows ComfyUI's text-encoder placement (CPU in
    low-VRAM modes), ``"vae"`` follows the VAE placement. ``dtype`` is the compute dtype (weights
    may be stored narrower, see core.precision); for GGUF models the weights stay quantized and
    their layers (core.gguf) dequantize into it. ``extras`` may hold ``"source"`` (a mapped file,
    checked before every use) and ``"dequant_cache"`` (set for quantized models and for diffusion models whose
    weights are stored narrower than they compute). Its plain Linear layers
    become core.matmul's (oneDNN products on CPUs where they are faster; nothing else changes).
    """

    module: torch.nn.Module
    kind: str
    name: str
    dtype: torch.dtype
    quantized: bool = False
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        trim_when_collected(self.module)  # freed weights go back to the OS, not only to the heap (core.heap)
        if isinstance(self.module, torch.nn.Module):
            from .matmul import adopt

            adopt(self.module)
        if self.quantized and "dequant_cache" not in self.extras:
            from .gguf import adopt_gguf_layers  # GGUF layers: EditKit's fast, streamable ones (core.gguf)

            cache = adopt_gguf_layers(self.module)
            if cache is not None:
                self.extras["dequant_cache"] = cache
        elif self.kind == "diffusion" and "dequant_cache" not in self.extras and isinstance(self.module, torch.nn.Module):
            # weights stored narrower than computed (a bf16 file on a CPU): keep cast copies while memory is lent
            from .precision import attach_cast_cache

            cache = attach_cast_cache(self.module)
            if cache is not None:
                self.extras["dequant_cache"] = cache

    def check_source(self) -> None:
        """Refuse to run on weights whose mapped file was overwritten in place (see core.gguf)."""
        source = self.extras.get("source")
        if source is not None:
            source.check()

    def lend_cache_memory(self, free_bytes: int) -> None:
        """Let the dequantized-layer cache of a GGUF model use part of ``free_bytes`` (core.gguf).

        What the cache already holds counts as free for its budget: the host measured ``free_bytes``
        with the cache's own memory taken, and shrinking the budget below it would empty the cache at
        every acquire of a model that stays loaded.
        """
        cache = self.extras.get("dequant_cache")
        if cache is not None:
            from .gguf import cache_budget_from_env

            cache.set_budget(cache_budget_from_env(free_bytes + cache.used))

    def drop_caches(self) -> None:
        """Free what the model keeps beside its weights (dequantized GGUF layers)."""
        cache = self.extras.get("dequant_cache")
        if cache is not None:
            cache.clear()

    @property
    def device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        return torch.device("cpu")


class Progress:
    """Progress of one loop; ``update`` takes an optional zero-argument preview function.

    The preview function is called only by hosts that show previews, so a sampler pays for
    computing a preview latent only when someone looks at it.
    """

    def __init__(self, total: int, callback: Callable[[int, int, PreviewFn | None], None] | None = None):
        self.total = total
        self.value = 0
        self._callback = callback

    def update(self, preview: PreviewFn | None = None, n: int = 1) -> None:
        self.value = min(self.total, self.value + n)
        if self._callback is not None:
            self._callback(self.value, self.total, preview)


class Runtime(ABC):
    """Interface used by pipelines; see the module docstring."""

    @abstractmethod
    def acquire(self, component: Component, memory_required: int = 0) -> torch.device:
        """Make ``component`` usable and return the device to run it on."""

    @abstractmethod
    def progress(self, total: int, preview_format: str = "Flux") -> Progress:
        """A progress reporter for a loop of ``total`` steps.

        ``preview_format`` names the ComfyUI latent format whose RGB factors render previews of the
        loop's latents (a :class:`~.latent_format.LatentFormat`'s ``preview``).
        """

    @abstractmethod
    def check_interrupt(self) -> None:
        """Raise if the user asked to stop. Called once per step; must not sync the GPU."""

    @property
    def intermediate_device(self) -> torch.device:
        """Where results handed to other nodes live (ComfyUI keeps IMAGE/LATENT on the CPU)."""
        return torch.device("cpu")

    def empty_cache(self) -> None:
        """Return cached, unused accelerator memory (before retrying something that ran out of it)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class TorchRuntime(Runtime):
    """Plain-torch host: moves models to one device, no memory manager.

    ``interrupt()`` (thread-safe) makes the next ``check_interrupt`` raise
    :class:`~.errors.Interrupted`, which is how tests and the CLI stop a run.
    ``on_progress`` receives ``(value, total, preview_fn)`` for every update.
    """

    def __init__(self, device: torch.device | str | None = None, on_progress=None,
                 intermediate: torch.device | str = "cpu"):
        self.device = torch.device(device) if device is not None else default_device()
        self.on_progress = on_progress
        self._intermediate = torch.device(intermediate)
        self._interrupt = threading.Event()

    @property
    def intermediate_device(self) -> torch.device:
        return self._intermediate

    def acquire(self, component: Component, memory_required: int = 0) -> torch.device:
        component.check_source()
        if component.device != self.device:
            component.drop_caches()
            component.module.to(self.device)
        if "dequant_cache" in component.extras:  # CPU compute only: on a GPU dequantizing costs a few percent
            from .gguf import free_memory

            free = free_memory(self.device) - memory_required if self.device.type == "cpu" else 0
            component.lend_cache_memory(max(0, free))
        return self.device

    def progress(self, total: int, preview_format: str = "Flux") -> Progress:
        return Progress(total, self.on_progress)

    def interrupt(self) -> None:
        self._interrupt.set()

    def check_interrupt(self) -> None:
        if self._interrupt.is_set():
            self._interrupt.clear()
            raise Interrupted("EditKit run interrupted")
