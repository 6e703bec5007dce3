"""transformers models (the text encoders) built from a single file's tensors by transformers' own loader.

Single-file text encoders (ComfyUI's ``clip_l``, ``t5xxl``, ``qwen_2.5_vl_7b``, ``qwen_3_4b``) carry weights
only; each family infers a transformers config from their shapes and renames their keys. The model is then
made by ``from_pretrained(None, config=..., state_dict=...)``, the path transformers documents for "a
configuration and a state dictionary", rather than by ``load_state_dict`` and ``.to(dtype)`` by hand, because
the loader also does what a hand-made load gets wrong:

* buffers the file does not hold are made by the model's own ``__init__`` in the dtype transformers gives
  them: the rotary embeddings' inverse frequencies stay **float32** in a bf16 model (``model.to(bf16)``
  rounds them, and Qwen2.5-VL's encoder states then differ by 0.59 % relative L2 from transformers' own
  bf16 load with two pictures, the phase error growing with position); position ids are made too;
* modules the model lists in ``_keep_in_fp32_modules`` stay float32 (T5's ``wo`` in fp16);
* tied embeddings are tied (T5's ``shared`` / ``encoder.embed_tokens``).

Tensors already in the requested dtype are used in place (no copy), so loading costs no more memory than
the file's tensors. A model built here equals the same weights loaded by ``from_pretrained`` from a
diffusers folder, bit for bit (tested).

fp8 files (``t5xxl_fp8_e4m3fn``, ``qwen_2.5_vl_7b_fp8_scaled``: e4m3fn, e5m2, ComfyUI's scaled fp8) keep their
Linear weights in fp8 (issue 17): transformers' loader would cast every tensor to ``torch_dtype``, so those
weights are set aside before it runs, replaced by zero-stride placeholders already in ``torch_dtype`` (which
it takes as they are, no memory), and put back into the built model's Linear layers afterwards
(:func:`~.precision.restore_fp8`: :class:`~.precision.CastLinear` casting per call, times the layer's scale).
fp8 weights of other layers (embeddings, convolutions) and of the model's ``_keep_in_fp32_modules`` (T5's
``wo``, whose input transformers casts to its weight's dtype) are widened with their scale.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelFileError
from .precision import PLAIN_LINEARS


def _set_fp8_aside(model_cls, config, sd: dict[str, torch.Tensor], dtype: torch.dtype
                   ) -> dict[str, tuple[torch.Tensor, float]]:
    """Take the fp8 Linear weights out of ``sd`` (placeholders in their place), widen other fp8 tensors."""
    from .single_file import is_fp8, take_fp8_scales

    scales = take_fp8_scales(sd)
    if not any(is_fp8(t) for t in sd.values()):
        return {}
    with torch.device("meta"):
        skeleton = model_cls(config)
    keep32 = set(getattr(model_cls, "_keep_in_fp32_modules", None) or ())
    linears = {name for name, m in skeleton.named_modules()
               if type(m) in PLAIN_LINEARS and not keep32.intersection(name.split("."))}
    kept, widened = {}, {}
    for key, tensor in list(sd.items()):
        if not is_fp8(tensor):
            continue
        scale = scales.get(key, 1.0)
        if key.endswith(".weight") and key[: -len(".weight")] in linears:
            kept[key] = (tensor, scale)
            sd[key] = torch.zeros((), dtype=dtype).expand(tensor.shape)
        else:  # tied copies (T5's shared / encoder.embed_tokens) share one widened tensor
            if id(tensor) not in widened:  # fp8 fits every wider float exactly: one copy, scaled in place
                widened[id(tensor)] = tensor.to(dtype).mul_(scale) if scale != 1.0 else tensor.to(dtype)
            sd[key] = widened[id(tensor)]
    return kept


def from_state_dict(model_cls, config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, path: Path,
                    expected: str):
    """``model_cls`` with ``config``, holding ``state_dict`` (keys as the model names them), in ``dtype``.

    Keys the model does not have are ignored; missing tensors or other shapes raise :class:`ModelFileError`
    naming ``path`` and what was ``expected``. The model is in eval mode without gradients. fp8 Linear
    weights (with ``<layer>.scale_weight`` / ``weight_scale`` keys for scaled files) stay fp8, computing in
    ``dtype``.
    """
    from .precision import restore_fp8

    what = expected.split(" (")[0]
    kept = _set_fp8_aside(model_cls, config, state_dict, dtype)
    model, info = model_cls.from_pretrained(None, config=config, state_dict=state_dict, torch_dtype=dtype,
                                            output_loading_info=True, ignore_mismatched_sizes=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelFileError(path, f"Not a complete {what}: {len(missing)} tensors missing, e.g. {missing[:3]}",
                             expected)
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shown = "; ".join(f"{key}: file {tuple(theirs)}, model {tuple(ours)}" for key, theirs, ours in mismatched[:3])
        raise ModelFileError(path, f"Tensor shapes do not match {what} ({len(mismatched)} tensors, e.g. {shown})",
                             expected)
    restore_fp8(model, kept, dtype)
    return model.eval().requires_grad_(False)


def from_folder(model_cls, folder: Path, sub: str, dtype: torch.dtype, expected: str) -> tuple[torch.nn.Module, str]:
    """``model_cls`` from a diffusers folder's ``sub`` (``text_encoder``), with its display name; clear errors."""
    where = folder / sub
    if not (where / "config.json").is_file():
        raise ModelFileError(where, "No text encoder in this diffusers folder", f"a '{sub}' sub-folder")
    try:
        model = model_cls.from_pretrained(str(where), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(where, f"Cannot load the text encoder ({exc})", expected) from exc
    return model, f"{folder.name}/{sub}"
