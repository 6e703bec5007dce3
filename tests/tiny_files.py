"""What every tiny-model generator shares: random weights that matter, and writing them in users' file formats.

The family generators (``make_tiny_models.py`` for FLUX.1, ``qwen_image_models.py``, ``qwen_layered_models.py``,
``zimage_models.py``, ``tiny_redux_models.py``) state only their family's configs and key conversions; rounding,
randomising zero-initialised layers, safetensors and GGUF writing, the per-process tree cache and the command
line live here once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def round_(module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
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


def save(state_dict: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None,
         metadata: dict | None = None) -> None:
    """Write a ``.safetensors`` file, floating tensors cast to ``dtype`` when given."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata=metadata)


def write_gguf(state_dict: dict[str, torch.Tensor], path: Path, quant: str = "Q8_0", arch: str = "flux",
               name: str | None = None) -> None:
    """Write tensors as GGUF the way city96's converters lay models out: 2-D weights whose rows split into
    32-blocks quantized to ``quant`` (any GGML type gguf-py writes: Q8_0, Q5_1, Q4_0, ...), the rest F32."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, quant)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    if name:
        writer.add_name(name)
    for key, tensor in state_dict.items():
        array = tensor.float().contiguous().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            writer.add_tensor(key, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(key, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def cached_tree(cache: dict, tmp_root: Path, components: Callable[[], dict],
                write: Callable[[Path, dict], dict]) -> dict:
    """Components and the files written from them, built once per process (test modules share them)."""
    if not cache:
        built = components()
        cache.update(components=built, paths=write(tmp_root, built))
    return cache


def main(make: Callable[[str], dict], description: str, argv=None) -> int:
    """The generators' command line: ``python tests/<generator>.py OUT_DIR`` writes the tree and lists it."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write the models tree into (created if missing)")
    paths = make(parser.parse_args(argv).out_dir)
    width = max((len(role) for role in paths), default=0)
    sys.stdout.write("".join(f"{role:>{width}}: {path}\n" for role, path in sorted(paths.items())))
    return 0
