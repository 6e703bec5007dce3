"""Memory of EditKit's loaders on real-shape random-weight files, in every format users download (issue 17, item 7).

Writes a transformer with random weights at real width (``--family``: Z-Image-Turbo, FLUX.1 or Qwen-Image;
``--layers`` main blocks: 30 = the real Z-Image 6B, 19 (+38 single) = FLUX.1 12B, 60 = Qwen-Image 20B) as
ComfyUI's bf16 single file, ComfyUI's scaled-fp8 single file, GGUF Q8_0 and Q4_K, and a diffusers folder; then
loads each in a fresh process (so one load's allocator state never colours the next) and prints:

* load time;
* load peak RSS / file bytes (``VmHWM`` growth over the process before loading);
* resident / file bytes (RSS growth once loaded);
* ComfyUI's ``model_size()`` (its formula: bytes of the state dict) / bytes really held (RSS growth);
* RSS after freeing (the component dropped, ``gc.collect()``), above the baseline before loading.

Targets from issue 17: resident <= 1.05x the file for fp8 and GGUF, load peak <= 1.15x, after free <= baseline +
5 %. Run (the defaults write ~4 GB under --out and need ~6 GB of RAM)::

    python scripts/bench/memory.py --out /tmp/editkit-mem                # Z-Image, 3 blocks, real per-block shapes
    python scripts/bench/memory.py --out /tmp/editkit-mem --family flux --layers 1 --formats comfy_fp8_scaled
    python scripts/bench/memory.py --out /tmp/editkit-mem --layers 30    # the real 6B model (~30 GB of files)

Compute dtype is bf16 (``--dtype``) so bf16 files are not widened to fp32 by the choice itself. Never run from
the tests: it writes gigabytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# run as a script, this folder comes first on sys.path, and its gguf.py (the GGUF benchmark) would shadow the gguf
# package diffusers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

COMFY_PREFIX = "model.diffusion_model."
FORMATS = ("comfy_bf16", "comfy_fp8_scaled", "gguf_Q8_0", "gguf_Q4_K", "diffusers_folder")


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


FAMILIES = {  # config, diffusers class, the block counts --layers sets, loading module
    "zimage": ("pipelines/zimage/configs/zimage_transformer/config.json", "ZImageTransformer2DModel",
               lambda n: {"n_layers": n}, "editkit.pipelines.zimage.loading"),
    "flux": ("pipelines/flux/configs/flux_fill_transformer/config.json", "FluxTransformer2DModel",
             lambda n: {"num_layers": n, "num_single_layers": 2 * n}, "editkit.pipelines.flux.loading"),
    "qwen": ("pipelines/qwen_image/configs/transformer/config.json", "QwenImageTransformer2DModel",
             lambda n: {"num_layers": n}, "editkit.pipelines.qwen_image.loading"),
}


def _model(family: str, layers: int):
    import diffusers
    import torch

    config_path, class_name, depth, _module = FAMILIES[family]
    config = json.loads((ROOT / config_path).read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")} | depth(layers)
    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.normal_(0, 0.02, generator=g)
    return model.to(torch.bfloat16).eval()


def _to_comfy(family: str, sd: dict) -> dict:
    """The single-file layout ComfyUI users download, keys with ComfyUI's ``model.diffusion_model.`` prefix."""
    if family == "zimage":
        from zimage_models import diffusers_to_comfy

        return diffusers_to_comfy(sd)
    if family == "flux":
        from editkit.pipelines.flux.layout import diffusers_transformer_to_bfl

        return diffusers_transformer_to_bfl(sd, prefix=COMFY_PREFIX)
    return {COMFY_PREFIX + k: v for k, v in sd.items()}


def _write_random_q4_k(sd, path: Path) -> None:
    """A GGUF file whose 2-D weights (rows of whole 256-blocks) are random Q4_K blocks with small fp16 scales,
    the rest F32, laid out as city96's files are."""
    import gguf
    import numpy as np

    q4k = gguf.GGMLQuantizationType.Q4_K
    block, size = gguf.GGML_QUANT_SIZES[q4k]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch="zimage")
    for name, tensor in sd.items():
        if tensor.ndim == 2 and tensor.shape[1] % block == 0:
            rows, blocks = tensor.shape[0], tensor.shape[1] // block
            raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
            raw[..., 0:4] = np.frombuffer(np.array([1e-3, 1e-3], dtype=np.float16).tobytes(), dtype=np.uint8)
            writer.add_tensor(name, raw.reshape(rows, blocks * size), raw_dtype=q4k)
        else:
            writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_files(out: Path, layers: int, formats, family: str = "zimage") -> dict[str, Path]:
    """Write the model in each format once (kept between runs: delete --out to rebuild)."""
    import torch
    from safetensors.torch import save_file

    from make_tiny_models import write_gguf
    from packload import load_pack

    load_pack()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{family}_{layers}l"
    paths = {f: out / name for f, name in {
        "comfy_bf16": f"{stem}_bf16.safetensors", "comfy_fp8_scaled": f"{stem}_fp8_scaled.safetensors",
        "gguf_Q8_0": f"{stem}-Q8_0.gguf", "gguf_Q4_K": f"{stem}-Q4_K.gguf",
        "diffusers_folder": f"{stem}-diffusers"}.items() if f in formats}
    if all(p.exists() for p in paths.values()):
        return paths
    model = _model(family, layers)
    comfy = _to_comfy(family, model.state_dict())
    if "comfy_bf16" in paths and not paths["comfy_bf16"].exists():
        save_file({k: v.contiguous() for k, v in comfy.items()}, str(paths["comfy_bf16"]))
    if "comfy_fp8_scaled" in paths and not paths["comfy_fp8_scaled"].exists():
        fp8 = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
        for key, tensor in comfy.items():
            if tensor.ndim == 2 and key.endswith(".weight"):
                scale = tensor.float().abs().max().clamp(min=1e-12) / 448.0
                fp8[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
                fp8[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
            else:
                fp8[key] = tensor.contiguous()
        save_file(fp8, str(paths["comfy_fp8_scaled"]))
    plain = {k[len(COMFY_PREFIX):]: v for k, v in comfy.items()}
    for fmt in ("gguf_Q8_0", "gguf_Q4_K"):
        if fmt in paths and not paths[fmt].exists():
            if fmt == "gguf_Q4_K":  # gguf-py has no Q4_K quantizer: random blocks, which is all a memory test needs
                _write_random_q4_k(plain, paths[fmt])
            else:
                write_gguf(plain, paths[fmt], fmt.split("_", 1)[1])
    if "diffusers_folder" in paths and not paths["diffusers_folder"].exists():
        model.save_pretrained(str(paths["diffusers_folder"] / "transformer"))
    return paths


def measure(fmt: str, path: Path, dtype_name: str, family: str = "zimage") -> dict:
    """One load in this process (called in a fresh child by :func:`main`)."""
    import torch

    from packload import load_pack, offline

    offline()
    load_pack()
    import importlib

    import diffusers  # noqa: F401  (the model classes' imports are not the model's memory)

    getattr(diffusers, FAMILIES[family][1])
    loading = importlib.import_module(FAMILIES[family][3])

    dtype = getattr(torch, dtype_name)
    gc.collect()
    base_rss, base_peak = _status("VmRSS"), _status("VmHWM")
    start = time.perf_counter()
    if fmt == "diffusers_folder":
        component = loading.transformer_source(path, None, dtype).get()
    else:
        component = loading.transformer_source(None, path, dtype).get()
    seconds = time.perf_counter() - start
    with torch.no_grad():  # read every weight once, as a sampling step does: mapped pages become resident
        for tensor in component.module.state_dict().values():
            torch.Tensor(tensor).reshape(-1).view(torch.uint8)[::4096].sum()
        del tensor  # one live tensor of a mapped file would keep the whole mapping
    gc.collect()
    rss, peak = _status("VmRSS"), _status("VmHWM")
    model_size = sum(t.numel() * t.element_size() for t in component.module.state_dict().values())
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in component.module.parameters()})
    del component
    gc.collect()
    after_free = _status("VmRSS")
    file_bytes = _size(path)
    held = rss - base_rss
    return {"format": fmt, "file_GB": file_bytes / 1e9, "load_s": seconds,
            "peak_over_file": (max(peak, base_peak) - base_rss) / file_bytes, "resident_over_file": held / file_bytes,
            "model_size_over_held": model_size / held if held > 0 else float("nan"),
            "after_free_over_baseline": after_free / base_rss - 1, "param_dtypes": dtypes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the files are written (kept for reruns)")
    parser.add_argument("--family", default="zimage", choices=sorted(FAMILIES))
    parser.add_argument("--layers", type=int, default=3,
                        help="main blocks (real: Z-Image 30, FLUX.1 19 (+2x single), Qwen-Image 60)")
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype asked of the loader")
    parser.add_argument("--measure", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), args.dtype, args.family)))
        return 0
    paths = write_files(args.out, args.layers, args.formats, args.family)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print(f"{args.family}, real width, {args.layers} main blocks, compute {args.dtype}")
    print(f"{'format':18} {'file GB':>8} {'load s':>7} {'peak/file':>9} {'resident/file':>13} "
          f"{'model_size/held':>15} {'free vs base':>12}  stored as")
    for fmt, path in paths.items():
        done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--dtype", args.dtype,
                               "--family", args.family, "--measure", fmt, str(path)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{fmt:18} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{fmt:18} {r['file_GB']:8.2f} {r['load_s']:7.1f} {r['peak_over_file']:9.2f} "
              f"{r['resident_over_file']:13.2f} {r['model_size_over_held']:15.2f} {r['after_free_over_baseline']:+11.1%}"
              f"  {','.join(r['param_dtypes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
