"""Cast-on-forward for any module that owns tensors, so a host can stream every model layer by layer.

ComfyUI's memory manager loads part of a model onto the GPU and leaves the rest on the CPU; a layer left
behind must bring its weights to the input's device at every call. ComfyUI's own ``comfy.ops`` layers do
that for the plain torch layers (Linear, Conv, norms, Embedding), and ``nodes/comfy_bridge.py`` swaps those
in. diffusers and transformers models also hold tensors in layers comfy.ops has no class for: diffusers'
``RMSNorm`` and ``AdaLayerNorm*`` weights, ``QwenImageCausalConv3d`` (a Conv3d subclass with its own
forward), ``QwenImageRMS_norm``'s ``gamma``/``bias``, Z-Image's ``x_pad_token``/``cap_pad_token`` on the model
itself, rotary buffers. A class swap per type would miss the next new type (issue 17, fault 2: the Qwen-Image
transformer and VAE and the Z-Image transformer could not be partially loaded at all), so this module adds
one generic rule instead: a forward pre-hook that, when the module's own parameters or buffers are not on
the device of its input, swaps in copies on that device for the duration of the call (and the forward hook
puts the stored ones back, also when the call raises). The module's own forward runs unchanged, whatever
its type.

The hook follows ComfyUI's cast protocol without importing ComfyUI: ``comfy_cast_weights`` (the attribute
whose presence makes ComfyUI's ``ModelPatcher`` treat a module as streamable, and which it sets to True for
streamed modules) and ``weight_function``/``bias_function`` (functions ComfyUI applies to a streamed weight,
e.g. low-VRAM LoRA patches), applied to ``weight``/``bias`` whenever ComfyUI streams the module. It moves
tensors to the input's device only and never changes their dtype, so packed GGUF bytes and fp8 storage are
moved, never reinterpreted; dtypes are the business of the layers (core.precision, core.gguf).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

_SAVED = "_editkit_cast_saved"
MARK = "_editkit_cast_hooks"


def _input_device(args, kwargs) -> torch.device | None:
    """Device of the first floating-point tensor among the call's inputs (else of the first tensor)."""
    first = None
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            if leaf.is_floating_point():
                return leaf.device
            if first is None:
                first = leaf.device
    return first


def _apply(tensor: torch.Tensor, functions) -> torch.Tensor:
    for function in functions:
        tensor = function(tensor)
    return tensor


def _pre_hook(module: torch.nn.Module, args, kwargs):
    device = _input_device(args, kwargs)
    if device is None:
        return None
    streamed = bool(getattr(module, "comfy_cast_weights", False))
    saved = []
    for table in (module._parameters, module._buffers):
        for name, tensor in table.items():
            if tensor is None:
                continue
            functions = getattr(module, f"{name}_function", ()) if streamed and name in ("weight", "bias") else ()
            if tensor.device == device and not functions:
                continue
            saved.append((table, name, tensor))
            table[name] = _apply(tensor.to(device, non_blocking=True), functions)
    if saved:
        setattr(module, _SAVED, saved)
    return None


def _post_hook(module: torch.nn.Module, args, kwargs, output):
    saved = module.__dict__.pop(_SAVED, None)
    if saved:
        for table, name, tensor in saved:
            table[name] = tensor
    return None


def owns_tensors(module: torch.nn.Module) -> bool:
    """True when ``module`` holds parameters or buffers itself (not only through its children)."""
    return any(t is not None for t in module._parameters.values()) or any(
        t is not None for t in module._buffers.values())


def add_cast_hooks(module: torch.nn.Module) -> None:
    """Make ``module`` bring its own parameters and buffers to its input's device at every call (idempotent).

    Sets ComfyUI's ``comfy_cast_weights`` (False: not streamed until the memory manager says so) and empty
    ``weight_function``/``bias_function`` lists unless the module already has them.
    """
    if getattr(module, MARK, False):
        return
    module.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    module.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    setattr(module, MARK, True)
    if not hasattr(module, "comfy_cast_weights"):
        module.comfy_cast_weights = False
    for name in ("weight_function", "bias_function"):
        if not hasattr(module, name):
            setattr(module, name, [])


def make_streamable(module: torch.nn.Module, skip=lambda layer: False) -> int:
    """Add :func:`add_cast_hooks` to every sub-module (``module`` included) that owns tensors and is not
    ``skip``-ped (layers that cast by themselves). Returns how many modules were hooked."""
    hooked = 0
    for layer in module.modules():
        if owns_tensors(layer) and not skip(layer) and not getattr(layer, MARK, False):
            add_cast_hooks(layer)
            hooked += 1
    return hooked
