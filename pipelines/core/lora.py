"""LoRA for every model family through one mechanism: read once, applied only while a sampler runs.

Reading
    A LoRA file is read once (and shared while in use, like models) into
    :class:`LoraWeights`: per target layer of the *diffusers* model, the down matrix ``A [r, in]``,
    the up matrix ``B [out, r]`` and the factor ``alpha / r``. The formats people download are
    turned into that one form by diffusers' own converters (``<Family>LoraLoaderMixin.lora_state_dict``:
    kohya ``lora_unet_...`` keys with alphas, ComfyUI/BFL original keys, diffusers/PEFT keys), through
    a small per-family adapter, :class:`LoraFamily`. A family adds one entry (its mixin and, where
    diffusers leaves a gap, a key-fixing function); everything else here is family-agnostic. Each
    layer's ``alpha / r`` comes from its ``.alpha`` tensor where the file has one, else from the
    ``LoraConfig`` diffusers saved in the file, read by peft (:func:`_peft_config`), else it is 1.

Applying, and why forward hooks
    A LoRA'd model is the *same* shared module plus an immutable tuple of ``(LoraWeights, strength)``
    (:class:`LoraComponent`, handed out by :class:`LoraModelSource`). Samplers run the model inside
    :func:`applied_loras` (or a function decorated with :func:`applies_loras`), which registers a
    forward hook on each target layer that adds ``strength * alpha / r * B @ (A @ x)`` to the
    layer's output and removes every hook when the run ends, also on errors and interrupts. Chosen
    over the alternatives because it is the only one that meets all of:

    * *the base model is never changed*: merging ``W += s * B @ A`` and subtracting afterwards does
      not restore bf16/fp16 weights bit for bit, and a backup copy doubles memory; PEFT's
      ``inject_adapter`` replaces layer classes for good (its ``disable_adapters`` still runs the
      wrapper) and would fight ComfyUI's class swap to cast-capable layers. Hooks leave no trace: with
      strength 0, or once the LoRA node is removed, outputs are bitwise those of the base model;
    * *it does not depend on the layer class*: a hook works the same on ``torch.nn.Linear``, on
      ComfyUI's cast-capable ``Linear`` (weights streamed from the CPU under ``--lowvram``) and on
      quantized GGUF layers, whose packed weights cannot be merged into at all. The GGUF weights stay
      quantized; the LoRA runs beside them in the compute dtype;
    * *it works on any device*: the small LoRA matrices are moved to the device and dtype of the
      activations on the first call of a run and re-used for every later step (no per-step copy).

    Several LoRAs on one layer are concatenated into one low-rank pair (``[A1; A2]``, ``[s1 B1, s2 B2]``),
    so chaining costs two small matmuls per layer whatever the count. The cost of an applied LoRA is
    measured by ``python -m scripts.bench lora``.

Using it in a sampler (family-agnostic; see docs/lora.md)::

    @applies_loras                       # the first argument is the transformer Component
    def denoise(transformer, ...):       # inside, ``transformer`` is the shared base Component
        ...

A sampler run holds the hooks of one model at a time: two runs of the *same* module in parallel
threads would see each other's LoRAs (ComfyUI executes one prompt at a time, so this does not arise
there); a nested application on the same module is refused.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import EditKitError, ModelFileError
from .loading import file_key, shared
from .runtime import Component

log = logging.getLogger("EditKit")

LORA_EXTENSIONS = (".safetensors", ".sft")
_LORA_TYPES = "LoRA (low-rank A/B or down/up pairs)"

# --------------------------------------------------------------------------------------
# Which architecture a LoRA file is for (used for error messages only)

# Fragments of LoRA keys, compared after lower-casing and turning '_' into '.', so diffusers
# (``single_transformer_blocks.0``), kohya (``lora_unet_single_blocks_0``) and original
# (``diffusion_model.single_blocks.0``) spellings all match.
ARCHITECTURE_SIGNATURES: dict[str, tuple[str, ...]] = {
    "FLUX.1": ("double.blocks.", "single.blocks.", "single.transformer.blocks."),
    # FLUX.2 LoRAs in BFL keys share FLUX.1's block names; diffusers keys name FLUX.2's fused single-block
    # projection and its SwiGLU feed-forward. FLUX.1 stays first, so a FLUX.1 file is still named as one.
    "FLUX.2": ("double.blocks.", "single.blocks.", "single.transformer.blocks.", "to.qkv.mlp.proj",
               "ff.linear.in", "ff.context.linear.in"),
    "Qwen-Image": ("img.mlp.net.", "txt.mlp.net.", "img.mod.1.", "txt.mod.1."),
    "Z-Image": ("noise.refiner.", "context.refiner.", "feed.forward.w1.", "adaln.modulation."),
    "Stable Diffusion 1.x/2.x/XL (UNet)": ("down.blocks.", "up.blocks.", "input.blocks.", "output.blocks.",
                                           "mid.block."),
}


def _canonical(key: str) -> str:
    return key.lower().replace("_", ".")


def guess_architecture(keys: Iterable[str]) -> dict[str, int]:
    """How many keys carry each architecture's signature (architectures with none are left out)."""
    counts: dict[str, int] = {}
    canon = [_canonical(k) for k in keys]
    for name, fragments in ARCHITECTURE_SIGNATURES.items():
        hits = sum(1 for k in canon if any(f in k for f in fragments))
        if hits:
            counts[name] = hits
    return counts


# --------------------------------------------------------------------------------------
# Family adapters


ConvertFn = Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], dict[str, float]]]


def bare_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with diffusers' component prefix ``transformer.`` taken off its keys (no module is named so)."""
    return {key.removeprefix("transformer."): value for key, value in state_dict.items()}


def diffusers_converter(mixin: str, returns_alphas: bool = False, bare: bool = False) -> ConvertFn:
    """A converter that runs ``diffusers.loaders.<mixin>.lora_state_dict`` on a state dict.

    ``returns_alphas``: the mixin takes ``return_alphas=True`` (Flux's does) and returns the
    ``alpha`` entries of diffusers/PEFT files separately; other mixins fold alphas into the weights.
    ``bare``: the keys lose their ``transformer.`` prefix first. diffusers' Qwen-Image and Z-Image
    converters, which run as soon as a file has ``.alpha`` keys, put ``transformer.`` before every
    key they return, so a PEFT file's ``transformer.<module>`` keys would come back with it twice.
    """

    def convert(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        import diffusers.loaders as loaders

        loader = getattr(loaders, mixin)
        if bare:
            state_dict = bare_keys(state_dict)
        if returns_alphas:
            converted, alphas = loader.lora_state_dict(dict(state_dict), return_alphas=True)
            return converted, dict(alphas or {})
        return loader.lora_state_dict(dict(state_dict)), {}

    return convert


@dataclass(frozen=True)
class LoraFamily:
    """What one model family contributes to the LoRA mechanism (one entry per family).

    ``architecture`` is the family's key in :data:`ARCHITECTURE_SIGNATURES`; ``convert`` turns a
    file's tensors into diffusers keys (``[transformer.]<module>.lora_A.weight`` / ``lora_B.weight``)
    plus any separate alphas, usually :func:`diffusers_converter` of the family's mixin, wrapped by
    a key fix where diffusers has a gap; ``expected`` says in words what a fitting file is.
    """

    name: str
    display: str
    architecture: str
    convert: ConvertFn
    expected: str


# --------------------------------------------------------------------------------------
# LoRA weights


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One layer's LoRA: ``delta W = scale * up @ down`` (``down [r, in]``, ``up [out, r]``)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(eq=False)
class LoraWeights:
    """A LoRA file read for one family: its layers by diffusers module name."""

    name: str
    family: LoraFamily
    layers: dict[str, LoraLayer]
    ignored: tuple[str, ...] = ()  # parts for other components (text encoders), not applied
    key: tuple = field(default=(), repr=False)

    def __repr__(self) -> str:
        return f"<EditKit {self.family.display} LoRA {self.name}: {len(self.layers)} layers>"


def record_layer(converted: dict, alphas: dict, targets, down: torch.Tensor, alpha=None) -> None:
    """Record one original-layout LoRA layer as diffusers ``lora_A`` / ``lora_B`` pairs.

    A fused layer (FLUX.1's ``linear1``, Z-Image's ``qkv``) fans out to several diffusers modules: each gets
    the same down matrix, its own rows of the up matrix (``targets``: ``(module, rows)``), and the layer's alpha.
    """
    for target, rows in targets:
        converted[f"{target}.lora_A.weight"] = down
        converted[f"{target}.lora_B.weight"] = rows
        if alpha is not None:
            alphas[target] = float(alpha)


def _read_file(path: Path, expected: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import safetensors

    if not path.is_file():
        raise ModelFileError(path, "LoRA file not found", expected)
    if path.suffix.lower() not in LORA_EXTENSIONS:
        raise ModelFileError(path, f"Unsupported LoRA file type '{path.suffix}' (only .safetensors is read)",
                             expected)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as exc:  # corrupt or truncated files surface as many exception types
        raise ModelFileError(path, f"Cannot read the LoRA file, it is corrupt or not a safetensors file "
                                   f"({type(exc).__name__}: {exc})", expected) from exc
    if not tensors:
        raise ModelFileError(path, "The LoRA file holds no tensors", expected)
    return tensors, metadata


def _sample(keys: Iterable[str], n: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "") if keys else "none"


def _peft_config(path: Path, metadata: dict[str, str]):
    """peft's ``LoraConfig`` for the transformer from diffusers' saved adapter config, or None.

    diffusers writes the ``LoraConfig`` it trained with into the file's ``lora_adapter_metadata`` (one JSON
    object, keys prefixed with the component, ``transformer.r``); peft parses it, forward-compatibly (keys of
    newer peft versions are dropped with a warning), so ``r``, ``lora_alpha``, the patterns and ``use_rslora``
    mean exactly what they mean to peft. Unreadable metadata is ignored with a warning, as before.
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except ValueError:
        log.warning("EditKit: LoRA %s has unreadable lora_adapter_metadata; its alphas are taken as 1 per rank.",
                    path.name)
        return None
    if not isinstance(packed, dict):
        return None
    fields = {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")}
    fields = fields or {k: v for k, v in packed.items() if "." not in k}
    from peft import LoraConfig

    try:
        config = LoraConfig.from_peft_type(**fields)
    except (TypeError, ValueError) as exc:
        log.warning("EditKit: LoRA %s: peft cannot read its lora_adapter_metadata (%s); its alphas are taken as 1 "
                    "per rank.", path.name, exc)
        return None
    return config if isinstance(config, LoraConfig) else None


def _config_scale(path: Path, config, module: str, rank: int) -> float:
    """``alpha / r`` of one layer as peft's ``LoraModel`` derives it from its config (patterns by ``get_pattern_key``).

    Where EditKit differs: the rank is the one the file stores. peft would build the layer at the config's rank
    and fail to load a file that disagrees; EditKit applies what is stored and says so in the log.
    """
    from peft.utils.other import get_pattern_key

    config_rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    if int(config_rank) != rank:
        log.warning("EditKit: LoRA %s says rank %s for %s but stores rank %d; using %d.",
                    path.name, config_rank, module, rank, rank)
    return float(alpha) / (math.sqrt(rank) if config.use_rslora else rank)


_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down",
             ".lora_up.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up"}
_IGNORED_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoders.", "lora_te", "te.", "te1.", "te2.")


def _collect(path: Path, family: LoraFamily, converted: dict[str, torch.Tensor], alphas: dict,
             metadata: dict[str, str]) -> tuple[dict[str, LoraLayer], tuple[str, ...]]:
    """Group diffusers-key tensors into :class:`LoraLayer` s, with each layer's ``alpha / r``."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    alpha_of: dict[str, float] = {}
    for key, value in alphas.items():
        module = key[len("transformer."):] if key.startswith("transformer.") else key
        alpha_of[module.removesuffix(".alpha")] = float(value)
    for key, tensor in converted.items():
        if key.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
            continue
        key = key[len("transformer."):] if key.startswith("transformer.") else key
        if key.endswith(".alpha"):
            alpha_of[key[: -len(".alpha")]] = float(tensor)
            continue
        for suffix, role in _SUFFIXES.items():
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            unknown.append(key)
    adapter_like = ("lora", "lokr", "hada", "loha", "dora", "oft", "alpha")
    if unknown and (parts or any(f in k.lower() for k in unknown for f in adapter_like)):
        raise ModelFileError(
            path, f"The LoRA file has {len(unknown)} tensors EditKit cannot apply (e.g. {_sample(unknown)}; "
                  "only plain LoRA down/up pairs are supported, not LoKr, LoHa or DoRA)", family.expected)
    config = _peft_config(path, metadata) if any(m not in alpha_of for m in parts) else None
    layers: dict[str, LoraLayer] = {}
    for module, pair in parts.items():
        if set(pair) != {"down", "up"}:
            raise ModelFileError(path, f"The LoRA layer '{module}' has no {'up' if 'down' in pair else 'down'} "
                                       "matrix: the file is incomplete", family.expected)
        down, up = pair["down"], pair["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ModelFileError(path, f"The LoRA layer '{module}' has mismatched matrices (down "
                                       f"{tuple(down.shape)}, up {tuple(up.shape)})", family.expected)
        rank = down.shape[0]
        if module in alpha_of:
            scale = alpha_of[module] / rank
        elif config is not None:
            scale = _config_scale(path, config, module, rank)
        else:
            scale = 1.0  # no alpha anywhere: diffusers and peft apply B @ A as it is
        layers[module] = LoraLayer(down, up, scale)
    return layers, tuple(ignored)


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's ``save_pretrained`` prefix (``base_model.model.``) means the bare model: diffusers' ``transformer.``."""
    prefix = "base_model.model."
    if any(k.startswith(prefix) for k in state_dict):
        return {("transformer." + k[len(prefix):]) if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    return state_dict


def read_lora(path: str | Path, family: LoraFamily) -> LoraWeights:
    """Read and convert a LoRA file for ``family``; a clear error for foreign, empty or corrupt files."""
    path = Path(path)
    tensors, metadata = _read_file(path, family.expected)
    counts = guess_architecture(tensors)
    if counts and family.architecture not in counts:
        other = max(counts, key=counts.get)
        raise ModelFileError(
            path, f"This is a LoRA for {other}, not for {family.display} (found keys like "
                  f"{_sample(k for k in tensors if not k.endswith('.alpha'))})", family.expected)
    try:
        converted, alphas = family.convert(_strip_wrappers(tensors))
    except EditKitError:
        raise
    except Exception as exc:  # diffusers' converters reject foreign keys with many exception types
        raise ModelFileError(
            path, f"Not a {family.display} LoRA: diffusers' converter rejected it ({type(exc).__name__}: {exc}; "
                  f"found keys like {_sample(tensors)})", family.expected) from exc
    layers, ignored = _collect(path, family, converted, alphas, metadata)
    if not layers:
        what = "only text-encoder layers" if ignored else f"keys like {_sample(tensors)}"
        raise ModelFileError(path, f"No {family.display} transformer LoRA layers in this file (found {what})",
                             family.expected)
    if ignored:
        log.warning("EditKit: LoRA %s also has %d text-encoder tensors; EditKit applies LoRAs to the %s "
                    "transformer only, so those are not used.", path.name, len(ignored), family.display)
    return LoraWeights(path.name, family, layers, ignored, key=("lora", family.name, file_key(path)))


def load_lora(path: str | Path, family: LoraFamily) -> LoraWeights:
    """:func:`read_lora`, shared: the same unchanged file is read once while anything uses it."""
    path = Path(path)
    return shared(("lora", family.name, file_key(path)), lambda: read_lora(path, family))


# --------------------------------------------------------------------------------------
# Fitting a model


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear-like layer of any class (dense, cast-capable, GGUF), else None."""
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None),
                                                                                 int):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    shape = tuple(getattr(weight, "quant_shape", getattr(weight, "shape", ())))
    return (shape[1], shape[0]) if len(shape) == 2 else None


def check_fits(weights: LoraWeights, model: torch.nn.Module) -> None:
    """Raise if any LoRA layer has no linear layer of its size in ``model``."""
    problems = []
    for name, layer in weights.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such layer")
            continue
        features = _features(module)
        wanted = (layer.down.shape[1], layer.up.shape[0])
        if features is None:
            problems.append(f"{name}: not a linear layer")
        elif features != wanted:
            problems.append(f"{name}: LoRA {wanted[0]}->{wanted[1]} features, model {features[0]}->{features[1]}")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise EditKitError(
            f"LoRA '{weights.name}' does not fit this {weights.family.display} transformer: {len(problems)} of its "
            f"{len(weights.layers)} layers have no matching layer ({shown}). It was made for a model of another "
            f"architecture or size; use a LoRA trained for this model, or remove the LoRA node."
        )


# --------------------------------------------------------------------------------------
# LoRA'd models: the shared component plus LoRAs, applied per run


LoraStack = tuple[tuple[LoraWeights, float], ...]


@dataclass(eq=False)
class LoraComponent(Component):
    """The shared ``base`` component's module, with ``loras`` to apply while a sampler runs it.

    Anything that reads ``module``/``dtype``/``kind`` sees the base model's; hosts manage the
    ``base`` (samplers hand the base to the runtime, see :func:`applies_loras`).
    """

    base: Component | None = None
    loras: LoraStack = ()


def with_loras(component: Component, loras: LoraStack) -> Component:
    """``component`` with ``loras`` added (after any it already has); the base itself if none."""
    if isinstance(component, LoraComponent):
        base, loras = component.base, component.loras + tuple(loras)
    else:
        base, loras = component, tuple(loras)
    if not loras:
        return base
    return LoraComponent(module=base.module, kind=base.kind, name=f"{base.name} + LoRA", dtype=base.dtype,
                         quantized=base.quantized, extras=base.extras, base=base, loras=loras)


class LoraModelSource:
    """A lazy model handle plus LoRAs: ``get()`` gives a :class:`LoraComponent` over the shared model.

    Stands in for :class:`~.loading.LazyModel` wherever a family's model handle keeps its
    transformer (e.g. ``FluxModel.transformer``). Chaining flattens: the LoRAs of every LoRA node
    in a chain end up in one tuple over the original handle.
    """

    def __init__(self, base, loras: LoraStack):
        self.base = base
        self.loras = tuple(loras)
        self.key = ("lora", getattr(base, "key", id(base)), tuple((w.key, s) for w, s in self.loras))
        names = ", ".join(f"{w.name} x{s:g}" for w, s in self.loras)
        self.description = f"{getattr(base, 'description', 'model')} + LoRA {names}"

    @classmethod
    def chain(cls, source, weights: LoraWeights, strength: float) -> LoraModelSource:
        if isinstance(source, LoraModelSource):
            return cls(source.base, source.loras + ((weights, float(strength)),))
        return cls(source, ((weights, float(strength)),))

    def get(self) -> Component:
        component = self.base.get()
        for weights, strength in self.loras:
            if strength != 0.0:
                check_fits(weights, component.module)
        return with_loras(component, self.loras)

    def __repr__(self) -> str:
        return f"<EditKit {self.description}>"


def add_lora(handle, family: LoraFamily, path: str | Path, strength: float, attribute: str = "transformer"):
    """A copy of a family's model handle whose ``attribute`` (a lazy model) also applies a LoRA file.

    The file is read now (so a foreign or corrupt file fails at the LoRA node); the model is not
    loaded. The original handle, and the model other nodes share, are unchanged.
    """
    weights = load_lora(path, family)
    new = copy.copy(handle)
    setattr(new, attribute, LoraModelSource.chain(getattr(handle, attribute), weights, strength))
    return new


# --------------------------------------------------------------------------------------
# Applying for the duration of a run


class _Delta:
    """Forward hook adding ``up @ (down @ x)`` (strengths and alpha/r folded into ``up``)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self._source = (down, up)
        self._placed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        where = (output.device, output.dtype)
        pair = self._placed.get(where)
        if pair is None:  # first call of this run on this device/dtype; every later step re-uses it
            pair = self._placed[where] = tuple(t.to(device=output.device, dtype=output.dtype) for t in self._source)
        if x.dtype != output.dtype:
            x = x.to(output.dtype)
        delta = F.linear(F.linear(x, pair[0]), pair[1])
        if output.requires_grad or delta.shape != output.shape:
            return output + delta
        return output.add_(delta)


def _combined(loras: LoraStack, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, one ``(down, up)`` pair for every LoRA with a non-zero strength."""
    pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for weights, strength in loras:
        if strength == 0.0:
            continue
        for name, layer in weights.layers.items():
            up = layer.up.float() * (float(strength) * layer.scale)
            pieces.setdefault(name, []).append((layer.down.float(), up))
    out = {}
    for name, pairs in pieces.items():
        down = torch.cat([d for d, _ in pairs], dim=0) if len(pairs) > 1 else pairs[0][0]
        up = torch.cat([u for _, u in pairs], dim=1) if len(pairs) > 1 else pairs[0][1]
        out[name] = (down.to(dtype), up.to(dtype))
    return out


_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()


class applied_loras:  # noqa: N801 (used as a context manager, named like one)
    """``with applied_loras(component) as base:`` runs ``base.module`` with the component's LoRAs.

    ``component`` may be a plain :class:`Component` (nothing is applied) or a
    :class:`LoraComponent`; ``loras`` adds more. Yields the shared base component. Hooks are
    registered on entry and removed on exit, whatever happens in between, so the model's outputs
    after the block are bitwise what they were before it. LoRAs with strength 0 are skipped.
    """

    def __init__(self, component: Component, loras: LoraStack = ()):
        component = with_loras(component, loras)
        self.base = component.base if isinstance(component, LoraComponent) else component
        self.loras = component.loras if isinstance(component, LoraComponent) else ()
        self._handles: list = []
        self._owner = False

    def __enter__(self) -> Component:
        module = self.base.module
        deltas = _combined(self.loras, self.base.dtype)
        if not deltas:
            return self.base
        for weights, strength in self.loras:
            if strength != 0.0:
                check_fits(weights, module)
        with _ACTIVE_LOCK:
            if module in _ACTIVE:
                raise RuntimeError("LoRAs are already applied to this model (nested sampler runs on one model)")
            _ACTIVE[module] = True
            self._owner = True
        try:
            for name, (down, up) in deltas.items():
                hook = _Delta(down, up)
                self._handles.append(module.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self._release()
            raise
        return self.base

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._owner:
            self._owner = False
            with _ACTIVE_LOCK:
                _ACTIVE.pop(self.base.module, None)

    def __exit__(self, *exc) -> None:
        self._release()


def applies_loras(function):
    """Decorate a sampler function whose first argument is a transformer Component.

    The function body runs on the shared base component (what it hands to the runtime) with the
    component's LoRAs applied for exactly the duration of the call.
    """

    first = next(iter(inspect.signature(function).parameters))

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        component = args[0] if args else kwargs.pop(first)
        with applied_loras(component) as base:
            return function(base, *args[1:], **kwargs)

    return wrapper
