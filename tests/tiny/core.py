"""The tiny-model generator: a family declares its parts and files, the code here builds and writes them.

A :class:`Family` is a table: :class:`Part` s (each component: its class, a tiny config, its seed, the precision
its weights are rounded to), :class:`Folder` s (diffusers folders saved by the family's diffusers pipeline) and
:class:`File` s (single files: which part, the key layout users' files have, the format). A part names its class
by the family's own ``ComponentSpec`` (``"TRANSFORMER"``, ``"VAE"`` in ``pipelines/<family>/loading.py``) or by a
diffusers / transformers class name, so the tests build exactly the classes the loaders load.

Weights are rounded to what every file of them holds exactly (bf16, fp16, or fp8 values times a power of two)
before anything is written, so every loading path sees the same numbers and only GGUF differs (by its Q8_0
rounding). Zero-initialised tensors get noise (``randomize``), so every weight matters to what a test compares.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from packload import offline, pack_module  # noqa: E402

BF16, FP16 = torch.bfloat16, torch.float16
COMFY_PREFIX = "model.diffusion_model."  # ComfyUI's key prefix for diffusion models

# --------------------------------------------------------------------------------------------------------------
# Weights


def round_(module: torch.nn.Module, dtype: torch.dtype = BF16) -> None:
    """Round every floating weight to ``dtype`` precision (kept in float32), so a file in ``dtype`` is exact."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).float())


def randomize_(module: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> None:
    """Give zero-initialised tensors (diffusers zero-inits some outputs and pad tokens) random values, so every
    weight matters to the output a test compares."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and tensor.abs().max() == 0 and "norm" not in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def fp8_layer(key: str, tensor: torch.Tensor) -> bool:
    """Whether ComfyUI's fp8 files store this tensor in fp8: 2-D weights but embeddings and the LM head."""
    return tensor.ndim == 2 and key.endswith(".weight") and "embed" not in key and "lm_head" not in key


def pow2_scale(weight: torch.Tensor) -> float:
    """A power of two that maps the weight's largest value into fp8 e4m3's range."""
    peak = float(weight.abs().max()) or 1.0
    return 2.0 ** round(torch.log2(torch.tensor(peak / 256.0)).item())


def round_fp8_(module: torch.nn.Module, scaled: bool) -> dict[str, float]:
    """Round fp8 layers to fp8 (times a power-of-two scale when ``scaled``), the rest to bf16; return the scales
    (none unless ``scaled``)."""
    scales = {}
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and fp8_layer(name, tensor):
                scale = pow2_scale(tensor) if scaled else 1.0
                tensor.copy_((tensor / scale).to(torch.float8_e4m3fn).float() * scale)
                if scaled:
                    scales[name] = scale
            elif tensor.is_floating_point():
                tensor.copy_(tensor.to(BF16).float())
    return scales


def noise_filled(cls, config, seed: int, std: float) -> torch.nn.Module:
    """``cls(config)`` built without its (slow) weight initialisation, every parameter drawn from one seeded
    generator (norm scales at 1). Quick at any width: ComfyUI's own loaders need some real-width files."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        norm = "norm" in type(module).__name__.lower()
        for name, param in list(module._parameters.items()):
            if param is not None:
                ones = norm and name in ("weight", "gamma")
                value = torch.ones(param.shape) if ones else torch.randn(param.shape, generator=generator) * std
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def declaration(name: str):
    """EditKit's own declaration of family ``name`` (``pipelines/families.py``): what its loaders read."""
    return pack_module("pipelines.families").family(name)


def model_class(name: str, family=None):
    """A class by name: a component of EditKit's ``family`` declaration (``"transformer"``, ``"vae"``: its
    ``model_class``, so the tests build exactly what the loaders load), else a diffusers or transformers class."""
    import diffusers
    import transformers

    spec = getattr(family, name, None) if family is not None and name in ("transformer", "vae") else None
    name = getattr(spec, "model_class", name)
    return getattr(diffusers, name, None) or getattr(transformers, name)


# --------------------------------------------------------------------------------------------------------------
# File writers: ``writer(state_dict, path, scales)``; ``scales`` are the fp8 scales the rounding chose (or None)


def save(state_dict: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None,
         metadata: dict | None = None) -> None:
    """Write a ``.safetensors`` file, floating tensors cast to ``dtype`` when given."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata=metadata)


def write_gguf(state_dict: dict[str, torch.Tensor], path: Path, quant: str = "Q8_0", arch: str = "flux",
               name: str | None = None,
               pack: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Write tensors as GGUF the way city96's converters lay models out: 2-D weights whose rows split into
    ``quant``'s blocks (32 weights, 256 for the K-quants) stored as ``quant``, the rest F32. ``pack(array)``
    gives a weight's packed blocks (uint8, one row per weight row); by default gguf-py quantizes it, which it
    can for Q8_0, Q5_1, Q4_0, ... but not for the K-quants, so a caller writing those passes its own blocks."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, quant)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    pack = pack or (lambda array: gguf.quants.quantize(array, qtype))
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    if name:
        writer.add_name(name)
    for key, tensor in state_dict.items():
        array = tensor.float().contiguous().numpy()
        if array.ndim == 2 and array.shape[1] % block == 0:
            writer.add_tensor(key, pack(array), raw_dtype=qtype)
        else:
            writer.add_tensor(key, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def safetensors(dtype: torch.dtype | None = BF16):
    return lambda sd, path, _scales: save(sd, path, dtype)


def gguf(arch: str = "flux", name: str | None = None):
    return lambda sd, path, _scales: write_gguf(sd, path, arch=arch, name=name)


def fp8(style: str):
    """ComfyUI's fp8 files: fp8 layers stored as float8_e4m3fn, the rest bf16. ``"plain"``: no scales (the
    ``fp8_e4m3fn`` releases); ``"scaled"``: divided by a ``scale_weight`` per layer plus a ``scaled_fp8`` marker
    (``fp8_scaled`` text encoders); ``"mixed"``: Comfy-Org's ``fp8mixed``, a float32 ``weight_scale`` and a
    ``comfy_quant`` descriptor per layer, listed in the ``_quantization_metadata``. The scales are the rounding's
    (exact), else a power of two per layer (exact too: the weights are fp8 values)."""
    def write(sd: dict, path: Path, scales: dict | None) -> None:
        out, layers = {}, {}
        for key, tensor in sd.items():
            if not (fp8_layer(key, tensor) and (scales is None or key in scales)):
                out[key] = tensor.to(BF16)
                continue
            layer = key[: -len(".weight")]
            scale = 1.0 if style == "plain" else scales[key] if scales else pow2_scale(tensor)
            out[key] = (tensor / scale).to(torch.float8_e4m3fn)
            if style == "scaled":
                out[layer + ".scale_weight"] = torch.tensor(scale, dtype=torch.float32)
            elif style == "mixed":
                out[layer + ".weight_scale"] = torch.tensor(scale, dtype=torch.float32)
                out[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
                layers[layer] = {"format": "float8_e4m3fn"}
        if style == "scaled":
            out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
        save(out, path, metadata=metadata if style == "mixed" else None)
    return write


# --------------------------------------------------------------------------------------------------------------
# Declarations


@dataclass(frozen=True)
class Part:
    """One component. ``model``: a ``ComponentSpec`` of the family's loading module (``"TRANSFORMER"``), a
    diffusers/transformers class name, or a callable ``(built parts) -> module`` (config ignored). ``seed``:
    ``torch.manual_seed`` before building (None: the RNG goes on from the part before, as diffusers' pipelines
    built in one go do). ``randomize``: seed for noise in zero-initialised tensors. ``noise``: ``(seed, std)``,
    build without initialisation and draw every parameter (real-width parts). ``precision``: the dtype weights
    are rounded to, ``"fp8"`` / ``"fp8_scaled"`` (ComfyUI's fp8 files), or None. ``adjust(module)`` runs before
    rounding. ``on_demand``: built only when asked (too large for every tree)."""

    model: str | Callable
    config: dict = field(default_factory=dict)
    seed: int | None = None
    randomize: int | None = None
    noise: tuple[int, float] | None = None
    precision: torch.dtype | str | None = BF16
    adjust: Callable | None = None
    on_demand: bool = False


@dataclass(frozen=True)
class Folder:
    """A diffusers folder ``diffusers/<name>``, saved by ``pipeline`` from the parts and extras (``swap`` maps a
    pipeline argument to another part), its weights cast to ``dtype`` (None: float32 as built); ``index`` entries
    replace ``model_index.json``'s (a published folder names the library class where EditKit passes a subclass)."""

    name: str
    pipeline: str
    role: str = "folder"
    dtype: torch.dtype | None = None
    swap: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)
    index: dict = field(default_factory=dict)


@dataclass(frozen=True)
class File:
    """A single file ``<models dir>/<path>`` holding one part: ``keys`` turns diffusers keys into the file's
    layout, ``write`` writes it (:func:`safetensors`, :func:`gguf`, :func:`fp8`), ``extra`` tensors (markers)
    are added before the keys are turned."""

    path: str
    part: str
    keys: Callable[[dict], dict] | None = None
    write: Callable = safetensors(BF16)
    extra: dict = field(default_factory=dict)


def comfy_keys(sd: dict) -> dict:
    """diffusers keys as ComfyUI stores diffusion models whose keys are diffusers' own (Qwen-Image)."""
    return {COMFY_PREFIX + k: v for k, v in sd.items()}


@dataclass
class Family:
    """A family's tiny models: parts built in order, extras (tokenizers, scheduler, processors: ``extras(built)``
    returns them), then ``finish(components)``; folders and files written from them."""

    name: str
    declared: str | None  # the EditKit family (pipelines/families.py) whose components the parts name
    parts: dict[str, Part]
    folders: tuple[Folder, ...] = ()
    files: dict[str, File] = field(default_factory=dict)
    extras: Callable[[dict], dict] | None = None
    finish: Callable[[dict], None] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def build(self, name: str, built: dict | None = None, **overrides) -> torch.nn.Module:
        """One part, seeded and rounded (``overrides`` change its config: other widths, same recipe)."""
        import transformers

        offline()
        part = self.parts[name]
        if part.seed is not None:
            torch.manual_seed(part.seed)
        if callable(part.model):
            module = part.model(built or {})
        else:
            cls = model_class(part.model, declaration(self.declared) if self.declared else None)
            config = {**part.config, **overrides}
            if issubclass(cls, transformers.PreTrainedModel):
                config = cls.config_class(**config)
            if part.noise is not None:
                module = noise_filled(cls, config, *part.noise)
            else:
                module = cls(config) if not isinstance(config, dict) else cls(**config)
        if part.randomize is not None:
            randomize_(module, torch.Generator().manual_seed(part.randomize))
        if part.adjust is not None:
            part.adjust(module)
        if part.precision in ("fp8", "fp8_scaled"):
            module.fp8_scales = round_fp8_(module, scaled=part.precision == "fp8_scaled")
        elif part.precision is not None:
            round_(module, part.precision)
        return module.eval().requires_grad_(False)

    def components(self) -> dict:
        """Every part (but the on-demand ones) and the extras, in the declared order."""
        built: dict = {}
        for name, part in self.parts.items():
            if not part.on_demand:
                built[name] = self.build(name, built)
        built.update(self.extras(built) if self.extras else {})
        if self.finish is not None:
            self.finish(built)
        return built

    def pipeline(self, components: dict, cls: str, swap: dict | None = None, dtype=None, **kwargs):
        """diffusers' ``cls`` pipeline on the components (the reference the parity tests compare with)."""
        import diffusers

        pipeline_class = getattr(diffusers, cls)
        names = inspect.signature(pipeline_class.__init__).parameters
        swap = swap or {}
        chosen = {n: components[swap.get(n, n)] for n in names if swap.get(n, n) in components}
        if dtype is not None:
            chosen = {n: copy.deepcopy(c).to(dtype) if isinstance(c, torch.nn.Module) else c
                      for n, c in chosen.items()}
        return pipeline_class(**chosen, **kwargs)

    def write(self, out: str | Path, components: dict | None = None, single_files: bool = True) -> dict[str, Path]:
        """Write the folders (and, with ``single_files``, the files) into the models tree ``out``; return the
        paths by role."""
        components = components if components is not None else self.components()
        out, paths = Path(out), {}
        for folder in self.folders:
            paths[folder.role] = out / "diffusers" / folder.name
            self.pipeline(components, folder.pipeline, folder.swap, folder.dtype,
                          **folder.kwargs).save_pretrained(str(paths[folder.role]))
            if folder.index:
                index = paths[folder.role] / "model_index.json"
                index.write_text(json.dumps({**json.loads(index.read_text()), **folder.index}, indent=2))
        for role, file in self.files.items() if single_files else ():
            module = components[file.part] if file.part in components else self.build(file.part, components)
            sd = {**module.state_dict(), **file.extra}
            scales = getattr(module, "fp8_scales", None) or None
            if file.keys is not None:
                sd = file.keys(sd)
                scales = scales and {k: float(v) for k, v in file.keys(
                    {k: torch.tensor(v) for k, v in scales.items()}).items()}
            paths[role] = out / file.path
            file.write(sd, paths[role], scales)
        return paths

    def tree(self, tmp_root: Path) -> dict:
        """Components and the files written from them, built once per process (test modules share them)."""
        if not self._cache:
            built = self.components()
            self._cache.update(components=built, paths=self.write(tmp_root, built))
        return self._cache


def scheduler(family: str):
    """The family's shipped scheduler (what its loader uses without a folder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(declaration(family).scheduler_config(None))


def main(make: Callable[[str], dict], description: str, argv=None) -> int:
    """The command line: ``python tests/make_tiny_models.py OUT_DIR`` writes the tree and lists it."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write the models tree into (created if missing)")
    paths = make(parser.parse_args(argv).out_dir)
    width = max((len(role) for role in paths), default=0)
    sys.stdout.write("".join(f"{role:>{width}}: {path}\n" for role, path in sorted(paths.items())))
    return 0
