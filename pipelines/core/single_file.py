"""One reader for every family's single-file transformer and VAE: a family declares what differs, this does the rest.

ComfyUI users download transformers as one file: ``.safetensors`` in the original or diffusers key layout,
bf16, fp8 (``float8_e4m3fn``, ``float8_e5m2``), ComfyUI's "scaled fp8" (a ``scale_weight`` per layer and a
``scaled_fp8`` marker) or Comfy-Org's "fp8mixed" (a float32 ``weight_scale`` per fp8 layer), or ``.gguf``.
Every family used to repeat the same reader for them; a :class:`SingleFile` declaration now says only what
differs (how its file is recognised and a foreign one named, the key converter, the config read from the
shapes, extra config switches, layers whose fp8 weights must be widened) and :meth:`SingleFile.load` does:

1. read the file (GGUF: mapped, see ``core.gguf``), let the family strip its prefix and recognise the file;
2. take the fp8 scales out (both ComfyUI conventions), so the weights themselves stay fp8;
3. convert the keys to diffusers' names; the scales follow the same conversion (a fused ``qkv`` split in
   three keeps its one scale for each part);
4. read the config from the shapes;
5. dense files: build the diffusers model with empty (meta) parameters and *assign* the file's tensors to
   it (``load_state_dict(assign=True)``): no parameter is ever allocated twice, and fp8 weights enter the
   model as they are. Building with diffusers' ``from_single_file`` instead would copy every tensor into
   the dtype asked for: fp8 widened, or, with the zero-stride placeholders EditKit used to pass for them,
   the placeholders materialised (measured: load peak 2.0x the file for scaled fp8 Z-Image). Linear
   layers whose weight is fp8 become :class:`~.precision.CastLinear` that keep it (and its scale) and cast
   per call; fp8 tensors of other layers (norms, embeddings, the family's ``widen`` layers) are widened
   with their scale. Then the storage/compute precision is applied (``core.precision``).
   GGUF files: diffusers' ``from_single_file`` with its ``GGUFQuantizationConfig`` (the quantized layers
   are diffusers' and then EditKit's, ``core.gguf``), after dequantizing quantized tensors that no Linear
   layer will read (pad tokens, embeddings): diffusers would hand their packed bytes to the model.

VAEs (``kind="vae"``) take the same steps but are stored and run in one dtype, as ComfyUI runs its VAEs:
no layer keeps fp8 (an fp8 tensor, should a file have one, is widened times its scale), no per-layer
casting, no GGUF path (a GGUF VAE's float tensors load like a safetensors file's). They still build on the
meta device and take the file's tensors, so a VAE stored in the dtype it runs in is never copied.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import EditKitError, ModelFileError
from .loading import read_json, read_state_dict, strip_prefix
from .precision import FP8_TYPES, PLAIN_LINEARS, Precision, apply_precision, keep_fp8_layers
from .runtime import Component

log = logging.getLogger("EditKit")

FP8_MARKERS = ("scaled_fp8",)
NOT_WEIGHTS = (".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def check_rotary(config_dir: Path, key: str, head_dim: int, name: str) -> None:
    """Refuse a file whose attention heads are not as wide as the family's rotary embedding (config ``key``)."""
    axes = read_json(config_dir / "config.json")[key]
    if sum(axes) != head_dim:
        raise EditKitError(f"Attention heads are {head_dim} wide, but the {name}'s rotary embedding covers "
                           f"{sum(axes)}: this is not a {name}.")


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FP8_TYPES and not hasattr(tensor, "quant_type")


def take_fp8_scales(sd: dict[str, torch.Tensor]) -> dict[str, float]:
    """Remove fp8 scale tensors and markers from ``sd`` (in place); return ``{"<layer>.weight": scale}``.

    Two conventions exist: ComfyUI's "scaled fp8" files store ``<layer>.scale_weight`` (plus a ``scaled_fp8``
    marker and sometimes ``scale_input``); Comfy-Org's "fp8mixed" files store a float32 ``<layer>.weight_scale``
    per float8_e4m3fn layer (plus ``input_scale``/``comfy_quant`` descriptors). Either way the weight is
    ``stored * scale``. Scales that are not one number per tensor (block-wise int8 or fp4 schemes) are refused
    by name: silently dropping them would run the model with wrongly scaled weights.
    """
    for key in [k for k in sd if k in FP8_MARKERS or k.endswith(NOT_WEIGHTS)]:
        del sd[key]
    scales = {}
    for key in [k for k in sd if k.endswith((".scale_weight", ".weight_scale"))]:
        layer = key.rsplit(".", 1)[0]
        scale = sd.pop(key)
        weight = sd.get(layer + ".weight")
        if weight is None or not is_fp8(weight) or scale.numel() != 1:
            raise EditKitError(
                f"'{layer}' is quantized in a format EditKit does not read (only per-tensor scaled float8 layers, "
                "ComfyUI's 'scaled fp8' and 'fp8mixed', are). Use the bf16 file or a .gguf.")
        scales[layer + ".weight"] = float(scale.float().reshape(()))
    return scales


class _Tagged(torch.Tensor):
    """A meta tensor carrying the index of a weight's scale through any torch function (views, cat, split...).

    Results take the tag their tensor inputs share; inputs of different tags give -1 (a weight joined from
    weights of different scales). Meta: the shapes are real, the memory is none.
    """

    tag = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves, tree_map

        kwargs = kwargs or {}
        tags = {t.tag for t in tree_leaves((args, kwargs)) if isinstance(t, _Tagged)}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        tag = tags.pop() if len(tags) == 1 else -1
        return tree_map(lambda t: _tagged(t, tag) if isinstance(t, torch.Tensor) else t, out)


def _tagged(tensor: torch.Tensor, tag: int) -> _Tagged:
    tensor = tensor.as_subclass(_Tagged)
    tensor.tag = tag
    return tensor


def convert_scales(convert: Callable[[dict], dict], sd: dict[str, torch.Tensor], scales: dict[str, float]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``convert(sd)`` and the scales under the converted names.

    The scales follow the same conversion as the weights: the converter also runs on meta tensors of the
    weights' shapes tagged with the index of their scale (no memory, whatever the converter does), so a fused
    ``qkv`` split in three keeps its scale in each part. Parts of different scales joined into one weight
    cannot keep one scale and are refused.
    """
    if not scales:
        return convert(sd), {}
    values = [1.0, *scales.values()]
    index = {k: i + 1 for i, k in enumerate(scales)}
    shadow = {k: _tagged(torch.empty(getattr(t, "quant_shape", t.shape), dtype=t.dtype, device="meta"),
                         index.get(k, 0)) for k, t in sd.items()}
    converted = convert(sd)
    moved = {}
    for key, tagged in convert(shadow).items():
        if key not in converted or not is_fp8(converted[key]):
            continue
        if tagged.tag < 0:
            raise ValueError(f"{key} joins fp8 weights of different scales")
        moved[key] = values[tagged.tag]
    return converted, moved


@dataclass(frozen=True)
class SingleFile:
    """How a family's transformer or VAE loads from one file; :meth:`load` is the shared reader.

    The first of ``prefixes`` the file's keys carry is stripped (ComfyUI's ``model.diffusion_model.``);
    ``layout(sd)`` names the key layout (``"diffusers"``, the family's original one, another family's, or
    None); ``foreign`` maps another family's layout to the message that refuses it (None: "Not a <name>",
    with a few of the keys found). ``recognise(sd, path) -> (sd, layout)`` replaces all of that where a family
    needs more (Qwen-Image names what a foreign file is). ``to_diffusers(sd)`` converts layouts other than
    ``"diffusers"``; ``config_from(sd)`` reads the model's sizes from the (diffusers-key) shapes;
    ``check(config, path)`` may refuse the result; ``options`` are further config values (switches that add no
    weights, e.g. Qwen-Image-Edit-2511's ``zero_cond_t``); fp8 weights of modules named with a ``widen``
    prefix are widened (model code that reads a weight's dtype to pick its activations' dtype, such as
    diffusers' Z-Image timestep embedder). ``name`` is how messages call the model ("FLUX.1 transformer").
    ``unknown`` starts the message for a file of no layout (default "Not a <name>"); a ``foreign`` message
    may also be a function of the state dict (to say what the file is). ``kind="vae"``: a model stored and
    run in one dtype (see the module docstring); messages call it "the <name>" (a family has one).
    """

    model_class: str
    config_dir: Path
    name: str
    expected: str
    config_from: Callable[[dict], dict]
    layout: Callable[[dict], str | None] = lambda sd: "diffusers"
    prefixes: tuple[str, ...] = ("model.diffusion_model.",)
    foreign: tuple[tuple[str, str], ...] = ()
    recognise: Callable[[dict, Path], tuple[dict, str]] | None = None
    to_diffusers: Callable[[dict], dict] | None = None
    check: Callable[[dict, Path], None] | None = None
    options: tuple[tuple[str, object], ...] = ()
    widen: tuple[str, ...] = ()
    kind: str = "diffusion"
    unknown: str = ""

    def _recognise(self, sd: dict, path: Path) -> tuple[dict, str]:
        if self.recognise is not None:
            return self.recognise(sd, path)
        sd = strip_prefix(sd, self.prefixes)
        layout = self.layout(sd)
        refused = dict(self.foreign).get(layout)
        if refused is not None:
            raise ModelFileError(path, refused(sd) if callable(refused) else refused, self.expected)
        if layout is None:
            sample = ", ".join(list(sd)[:3]) or "no tensors"
            raise ModelFileError(path, f"{self.unknown or 'Not a ' + self.name} (found keys like {sample})",
                                 self.expected)
        return sd, layout

    def with_options(self, **options) -> SingleFile:
        return dataclasses.replace(self, options=(*self.options, *options.items()))

    def load(self, path: Path, dtype: torch.dtype, storage: torch.dtype | None = None) -> Component:
        """The model of ``path`` computing in ``dtype``, dense weights stored in ``storage`` (default ``dtype``).

        fp8 weights of Linear layers stay fp8 whatever ``storage`` says, GGUF weights stay quantized.
        """
        vae = self.kind == "vae"
        quantized = path.suffix.lower() == ".gguf" and not vae
        extras = {}
        if quantized:
            from .gguf import MappedFile

            extras["source"] = MappedFile(path)  # before reading: the identity of the bytes that get mapped
        sd, layout = self._recognise(read_state_dict(path, self.expected), path)
        scales = {} if quantized else take_fp8_scales(sd)
        try:
            if layout != "diffusers" and self.to_diffusers is not None:
                sd, scales = convert_scales(self.to_diffusers, sd, scales)
            config = self.config_from(sd)
        except ModelFileError:
            raise
        except (KeyError, IndexError, ValueError, RuntimeError) as exc:
            problem = f"Weights do not fit {self._a()}" if vae else f"Incomplete {self.name}"
            raise ModelFileError(path, f"{problem} ({exc})", self.expected) from exc
        if self.check is not None:
            self.check(config, path)
        config.update(self.options)
        try:
            if quantized:
                model = self._from_gguf(sd, config, dtype)
            else:
                model = self._assign(sd, config, Precision(dtype if vae else storage or dtype, dtype), scales, path)
        except ModelFileError:
            raise  # already says what is wrong with the file
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelFileError(path, f"Weights do not fit {self._a()} ({exc})", self.expected) from exc
        return Component(model.eval().requires_grad_(False), self.kind, path.name, dtype, quantized=quantized,
                         extras=extras)

    def _a(self) -> str:
        if self.kind == "vae":
            return f"the {self.name}"
        return f"{'an' if self.name[0] in 'AEIOU' else 'a'} {self.name}"

    def empty_model(self, config: dict) -> torch.nn.Module:
        """The model with parameters on the meta device (no memory) and real buffers (computed at build)."""
        from accelerate import init_empty_weights

        cls = _diffusers_class(self.model_class)
        with init_empty_weights(include_buffers=False):
            return cls.from_config({**cls.load_config(str(self.config_dir)), **config})

    def _assign(self, sd: dict, config: dict, precision: Precision, scales: dict[str, float], path: Path):
        model = self.empty_model(config)
        wanted = model.state_dict()
        missing = sorted(set(wanted) - set(sd))
        if missing:
            what = f"Not {self._a()}" if self.kind == "vae" else f"Not a complete {self.name}"
            raise ModelFileError(path, f"{what}: {len(missing)} tensors missing, e.g. {missing[:3]}", self.expected)
        modules = dict(model.named_modules())
        wide = precision.compute if precision.storage in FP8_TYPES else precision.storage  # --fp8_*-unet storage
        keeps = self.kind != "vae"  # a VAE keeps no fp8 layer
        for key in [k for k in sd if is_fp8(sd[k])]:
            owner, _, kind = key.rpartition(".")
            layer = modules.get(owner)
            if keeps and kind == "weight" and type(layer) in PLAIN_LINEARS and not owner.startswith(self.widen):
                continue  # stays fp8: keep_fp8_layers below
            widened = sd[key].to(wide)  # fp8 fits every wider float exactly: one copy, scaled in place
            scale = scales.pop(key, 1.0)
            if scale != 1.0:
                widened.mul_(scale)
            sd[key] = widened
        unused = sorted(set(sd) - set(wanted))
        if unused:
            log.debug("EditKit: %s: %d tensors the model does not use, e.g. %s", path.name, len(unused), unused[:3])
        model.load_state_dict({k: sd.pop(k) for k in wanted}, strict=True, assign=True)
        sd.clear()  # the model holds the tensors now; dropping these lets a widened copy free its source
        keep_fp8_layers(model, scales, precision.compute)
        return apply_precision(model, precision, self.widen)

    def _from_gguf(self, sd: dict, config: dict, dtype: torch.dtype):
        from diffusers import GGUFQuantizationConfig

        from .diffusers_compat import dequantize_gguf_tensor

        linears = {f"{n}.weight" for n, m in self.empty_model(config).named_modules()
                   if isinstance(m, torch.nn.Linear)}
        for key in [k for k, v in sd.items() if hasattr(v, "quant_type") and k not in linears]:
            sd[key] = dequantize_gguf_tensor(sd[key]).to(dtype)  # diffusers dequantizes Linear weights only
        return _diffusers_class(self.model_class).from_single_file(
            sd, config=str(self.config_dir), torch_dtype=dtype, local_files_only=True, **config,
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype))
