"""Real-size model files with random weights, written tensor by tensor (for the memory benchmark).

A 12B or 20B model cannot be built in this machine's 24 GB and then saved, and its memory behaviour does not
depend on the values of its weights. So the model is built on the meta device (shapes only, no memory), its
state dict is renamed to the layout of the file users download (the same converters the tests use), and every
tensor is streamed to disk from one reused block of random bytes: ComfyUI-style ``.safetensors`` in bf16 or
"scaled fp8" (``float8_e4m3fn`` weights with a per-layer ``scale_weight`` and the ``scaled_fp8`` marker), and
city96-style GGUF (2-D weights quantized, the rest F32). The random bytes are kept finite (bf16 and fp8
exponents below all-ones; GGUF block scales set to a small fp16), so a loader that inspects values finds
numbers. safetensors' and gguf-py's own writers hold every tensor in memory before writing, which is why the
two small writers here exist; both produce files those libraries read (checked by the loaders that read them).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 16 << 20
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def _pool() -> np.ndarray:
    """16 MiB of random bytes whose bf16 / fp8 reading is finite and small (sign random, exponent limited)."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=CHUNK, dtype=np.uint8)
    # bf16 (little endian): the high byte carries sign + 7 exponent bits; keep exponents well below all-ones
    raw[1::2] = (raw[1::2] & 0x80) | (0x30 + (raw[1::2] & 0x07))
    return raw


POOL = _pool()
FP8_POOL = (POOL & 0x80) | (0x20 + (POOL & 0x1F))  # e4m3fn: exponent <= 0b1001, never NaN
F32_POOL = np.frombuffer(np.full(CHUNK // 4, 1e-3, dtype=np.float32).tobytes(), dtype=np.uint8)


def _stream(handle, nbytes: int, pool: np.ndarray) -> None:
    while nbytes > 0:
        take = min(nbytes, len(pool))
        handle.write(pool[:take].tobytes())
        nbytes -= take


@dataclass(frozen=True)
class Tensor:
    """One tensor of a file to write: its name, shape and storage dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, tensors: list[Tensor], metadata: dict | None = None) -> int:
    """A ``.safetensors`` file of ``tensors`` with random finite values, written in 16 MiB pieces; its size."""
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    with open(partial, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for t in tensors:
            pool = FP8_POOL if t.dtype == torch.float8_e4m3fn else F32_POOL if t.dtype == torch.float32 else POOL
            _stream(handle, t.nbytes, pool)
    partial.rename(path)
    return path.stat().st_size


def write_gguf(path: Path, tensors: list[Tensor], quant: str, arch: str) -> int:
    """A GGUF file: 2-D weights whose rows are whole blocks quantized as ``quant`` (random blocks with a small
    fp16 scale), every other tensor F32, in city96's layout (ComfyUI-GGUF's files); its size."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    pool = POOL[: CHUNK // size * size].copy().reshape(-1, size)
    if qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        pool[:, 0:2] = np.frombuffer(np.float16(1e-3).tobytes(), dtype=np.uint8)
    elif qtype == gguf.GGMLQuantizationType.Q4_K:
        pool[:, 0:4] = np.frombuffer(np.array([1e-3, 1e-3], dtype=np.float16).tobytes(), dtype=np.uint8)
    pool = pool.reshape(-1)
    writer = gguf.GGUFWriter(str(path) + ".partial", arch=arch)
    plan = []
    for t in tensors:
        quantized = len(t.shape) == 2 and t.name.endswith(".weight") and t.shape[1] % block == 0
        if quantized:
            rows, cols = t.shape
            nbytes = rows * cols // block * size
            writer.add_tensor_info(t.name, (rows, cols // block * size), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        else:
            nbytes = int(np.prod(t.shape, dtype=np.int64)) * 4
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes)
        plan.append((nbytes, pool if quantized else F32_POOL))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handle = writer.fout[0] if isinstance(writer.fout, list) else writer.fout
    alignment = writer.data_alignment
    for nbytes, source in plan:
        handle.write(b"\0" * (-handle.tell() % alignment))
        _stream(handle, nbytes, source)
    handle.write(b"\0" * (-handle.tell() % alignment))
    writer.close()
    Path(str(path) + ".partial").rename(path)
    return path.stat().st_size


def _meta_state(cls, config: dict) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = cls(**config)
    return dict(model.state_dict())


def _config(relative: str, **changes) -> dict:
    config = json.loads((ROOT / "pipelines" / relative / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")} | changes


@dataclass(frozen=True)
class Family:
    """How one model's real-size file is laid out and loaded (for :mod:`scripts.bench.memory`)."""

    title: str
    stem: str
    file_state: Callable[[int | None], dict[str, torch.Tensor]]  # meta tensors, named as in the file
    folder_state: Callable[[int | None], dict[str, torch.Tensor]] | None
    folder_config: Callable[[int | None], dict] | None
    load: Callable[[Path | None, Path | None, torch.dtype], object]
    formats: tuple[str, ...]
    loader_module: str
    gguf_arch: str = ""
    full_depth: int = 0

    def warm_imports(self) -> None:
        """Import what loading imports (the model classes, the loader module, safetensors, gguf) without loading,
        so that the memory of imported code is not counted as the model's."""
        import importlib

        import gguf  # noqa: F401
        import safetensors.torch  # noqa: F401

        self.file_state(1)
        importlib.import_module(self.loader_module)
        # diffusers' single-file loader imports every model class it can build (UNets, VAEs, ControlNets: about
        # 20 MB of modules) the first time it runs; that is code, not the model's memory
        importlib.import_module("diffusers.loaders.single_file_model")
        import diffusers.models.autoencoders  # noqa: F401
        import diffusers.models.controlnets  # noqa: F401
        import diffusers.models.unets  # noqa: F401


def _zimage_meta(layers):
    from diffusers import ZImageTransformer2DModel

    return _meta_state(ZImageTransformer2DModel, _zimage_config(layers))


def _zimage_config(layers):
    return _config("zimage/configs/zimage_transformer", **({"n_layers": layers} if layers else {}))


def _zimage_file(layers):
    from tiny.zimage import diffusers_to_comfy

    return diffusers_to_comfy(_zimage_meta(layers))


def _zimage_load(folder, file, dtype):
    from editkit.pipelines.zimage import loading

    return loading.transformer_source(folder, file, dtype).get()


def _flux_meta(layers):
    from diffusers import FluxTransformer2DModel

    changes = {"in_channels": 64}  # FLUX.1-dev (Fill has 384: the same 12B within 0.1 %)
    if layers:
        changes |= {"num_layers": max(1, layers // 3), "num_single_layers": layers - max(1, layers // 3)}
    return _meta_state(FluxTransformer2DModel, _config("flux/configs/flux_fill_transformer", **changes))


def _flux_file(layers):
    from editkit.pipelines.flux.layout import diffusers_transformer_to_bfl

    return diffusers_transformer_to_bfl(_flux_meta(layers))


def _flux_load(folder, file, dtype):
    from editkit.pipelines.flux import loading

    return loading.transformer_source(folder, file, dtype).get()


def _qwen_file(layers):
    from diffusers import QwenImageTransformer2DModel

    config = _config("qwen_image/configs/transformer", **({"num_layers": layers} if layers else {}))
    return {f"model.diffusion_model.{k}": v for k, v in _meta_state(QwenImageTransformer2DModel, config).items()}


def _qwen_load(folder, file, dtype):
    from editkit.pipelines.qwen_image import loading

    return loading.transformer_source(folder, file, dtype).get()


def _qwen_vl_file(layers):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tiny.qwen_image import text_encoder_keys

    config = Qwen2_5_VLConfig.from_pretrained(str(ROOT / "pipelines/qwen_image/configs/text_encoder"))
    if layers:
        config.text_config.num_hidden_layers = layers
        config.vision_config.depth = max(1, layers // 2)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return text_encoder_keys()(dict(model.state_dict()))


def _qwen_vl_load(folder, file, dtype):
    from editkit.pipelines.qwen_image import text

    return text._text_encoder_from_file(file, dtype)


FAMILIES = {
    "zimage": Family("Z-Image-Turbo transformer (6B)", "z_image_turbo", _zimage_file, _zimage_meta, _zimage_config,
                     _zimage_load, ("comfy_bf16", "comfy_fp8_scaled", "gguf_Q8_0", "gguf_Q4_K", "diffusers_folder"),
                     "editkit.pipelines.zimage.loading", gguf_arch="lumina2", full_depth=30),
    "flux": Family("FLUX.1-dev transformer (12B)", "flux1-dev", _flux_file, None, None, _flux_load,
                   ("comfy_fp8_scaled", "gguf_Q8_0", "gguf_Q4_K"), "editkit.pipelines.flux.loading", gguf_arch="flux", full_depth=57),
    "qwen": Family("Qwen-Image-Edit transformer (20B)", "qwen_image_edit_2509", _qwen_file, None, None, _qwen_load,
                   ("gguf_Q4_K",), "editkit.pipelines.qwen_image.loading", gguf_arch="qwen_image", full_depth=60),
    "qwen_vl": Family("Qwen2.5-VL-7B text encoder", "qwen_2.5_vl_7b", _qwen_vl_file, None, None, _qwen_vl_load,
                      ("comfy_fp8_scaled",), "editkit.pipelines.qwen_image.text", full_depth=28),
}


def file_tensors(state: dict[str, torch.Tensor], fmt: str) -> Iterator[Tensor]:
    """The tensors of ``state`` (meta) as ``fmt`` stores them: scaled fp8 quantizes the Linear weights (2-D
    ``.weight``) and keeps a text model's token embedding in bf16, as ComfyUI's scaled-fp8 files do."""
    if fmt == "comfy_fp8_scaled":
        yield Tensor("scaled_fp8", (0,), torch.float8_e4m3fn)
    for name, tensor in state.items():
        shape = tuple(tensor.shape)
        if fmt == "comfy_fp8_scaled" and tensor.ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name:
            yield Tensor(name, shape, torch.float8_e4m3fn)
            yield Tensor(name[: -len(".weight")] + ".scale_weight", (), torch.float32)
        else:
            yield Tensor(name, shape, torch.bfloat16)


def write(family: Family, fmt: str, out: Path, layers: int | None) -> Path:
    """Write ``family`` in ``fmt`` under ``out`` (once: an existing file is reused) and return its path."""
    depth = f"{layers}l" if layers else "full"
    if fmt == "diffusers_folder":
        path = out / f"{family.stem}-{depth}-diffusers"
        if not path.exists():
            sub = path / "transformer"
            write_safetensors(sub / "diffusion_pytorch_model.safetensors",
                              list(file_tensors(family.folder_state(layers), "bf16")))
            (sub / "config.json").write_text(json.dumps(family.folder_config(layers), indent=2))
        return path
    suffix = {"comfy_bf16": "bf16.safetensors", "comfy_fp8_scaled": "fp8_scaled.safetensors",
              "gguf_Q8_0": "Q8_0.gguf", "gguf_Q4_K": "Q4_K.gguf"}[fmt]
    path = out / f"{family.stem}-{depth}-{suffix}"
    if not path.exists():
        state = family.file_state(layers)
        if fmt.startswith("gguf_"):
            prefix = "model.diffusion_model."
            tensors = [Tensor(k[len(prefix):] if k.startswith(prefix) else k, tuple(v.shape), torch.float32)
                       for k, v in state.items()]
            write_gguf(path, tensors, fmt.split("_", 1)[1], family.gguf_arch)
        else:
            write_safetensors(path, list(file_tensors(state, fmt)))
    return path
