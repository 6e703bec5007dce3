"""Benchmark GGUF and low-precision weights against dense ones (not a test; prints tables).

    python scripts/benchmark_gguf.py [--size 512] [--rounds 5] [--device cpu|cuda] [--parts calls,load,comfyui]
        [--comfyui /tmp/comfy/ComfyUI] [--comfy-python /tmp/comfy/venv/bin/python] [--steps 4] [--runs 4]

All parts use a real-width but shallow FLUX.1-Fill transformer (24x128 heads, T5/CLIP widths 4096/768,
1 double + 1 single block, as scripts/benchmark_fill.py builds it): every layer has its real size, so
per-layer costs and memory per block scale like FLUX.1-Fill-dev's (19 + 38 blocks).

``calls``  One transformer call (= one Fill sampling step, no CFG) at ``--size``², in this process, for
           dense fp32 weights (the reference), GGUF Q8_0/Q5_1/Q4_0 through EditKit's layers without and
           with the dequantized-layer cache, Q8_0 through diffusers' GGUF layers (what EditKit used
           before), bf16 stored / fp32 computed, and bf16 computed. Configurations alternate round by
           round; the table shows median wall seconds and median process CPU seconds per call (the CPU
           time is barely disturbed by other jobs on a shared machine) and ratios to dense fp32 from
           the same rounds. The first call of each configuration (it fills the cache) is not counted.
``load``   Loading the shallow transformer in a fresh process each: EditKit's mapped GGUF read, the
           copied read EditKit used before (diffusers' load_gguf_checkpoint), a bf16 .safetensors.
           Peak RSS above the process's RSS after imports, against the quantized weights' bytes.
``comfyui`` ComfyUI's real executor (a child process with ComfyUI's Python, ``--cpu``): native
           UNETLoader + InpaintModelConditioning + KSampler (euler, cfg 1, guidance 30) against EditKit
           Flux Loader + Flux Fill Inpaint on the same files and inputs (dense bf16 .safetensors and
           GGUF Q8_0), runs alternating, in two ComfyUI processes: default attention and
           ``--use-pytorch-cross-attention``. Seconds per step are the median interval between
           consecutive progress updates of the sampler; peak RSS during sampling is measured per run
           (VmHWM reset before each run). city96's ComfyUI-GGUF is compared when its folder is in
           ComfyUI's custom_nodes (it is not on the machine these numbers were taken on, so that row is
           skipped with the reason).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from packload import offline, pack_module  # noqa: E402

QUANTS = ("Q8_0", "Q5_1", "Q4_0")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS


# --------------------------------------------------------------------------------------
# Files


def write_files(folder: Path) -> dict[str, Path]:
    """The shallow transformer as a BFL bf16 .safetensors and as GGUF files; a real-size FLUX.1 VAE."""
    from make_tiny_models import _save, shallow_fill_transformer, write_gguf

    layout = pack_module("pipelines.flux.layout")
    folder.mkdir(parents=True, exist_ok=True)
    bfl = layout.diffusers_transformer_to_bfl(shallow_fill_transformer(torch.bfloat16).state_dict())
    paths = {"bf16": folder / "shallow-fill-bf16.safetensors"}
    _save(bfl, paths["bf16"], torch.bfloat16)
    for quant in QUANTS:
        paths[quant] = folder / f"shallow-fill-{quant}.gguf"
        write_gguf(bfl, paths[quant], quant)
    return paths


def write_vae(path: Path) -> None:
    """FLUX.1's VAE at its real size with random weights, in BFL layout (ComfyUI detects it by its shapes)."""
    from diffusers import AutoencoderKL

    from make_tiny_models import _save

    loading = pack_module("pipelines.flux.loading")
    layout = pack_module("pipelines.flux.layout")
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(loading.VAE_CONFIG_DIR)))
    _save(layout.diffusers_vae_to_bfl(vae.state_dict()), path, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Part 1: transformer calls in this process


def _inputs(config, size: int, device, dtype):
    flow = pack_module("pipelines.flux.flow")
    g = torch.Generator().manual_seed(0)
    side = size // 8
    tokens = (side // 2) ** 2
    return dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, generator=g).to(device, dtype),
        timestep=torch.tensor([0.6], device=device, dtype=dtype), guidance=torch.tensor([30.0], device=device),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, 512, config.joint_attention_dim, generator=g).to(device, dtype),
        txt_ids=flow.text_ids(512, device), img_ids=flow.token_ids(side, side, 0, device), return_dict=False,
    )


def _variants(paths: dict[str, Path], device: torch.device, uncached=QUANTS):
    """(label, component) pairs; each loaded once through EditKit's loaders (or built as before)."""
    loading = pack_module("pipelines.flux.loading")
    core_gguf = pack_module("pipelines.core.gguf")
    F32, BF16 = torch.float32, torch.bfloat16
    env_cache = os.environ.get("EDITKIT_GGUF_CACHE")

    def gguf_variant(quant: str, cache: bool, tag: str):
        component = loading.transformer_source(None, paths[quant], F32).derived(tag, lambda c: c, tag).get()
        os.environ["EDITKIT_GGUF_CACHE"] = "auto" if cache else "off"
        runtime = pack_module("pipelines.core.runtime").TorchRuntime(device)
        runtime.acquire(component)
        return component

    from diffusers.quantizers.gguf.utils import GGUFLinear as DiffusersGGUFLinear

    def before(component):
        for layer in component.module.modules():
            if isinstance(layer, core_gguf.GGUFLinear):
                layer.__class__ = DiffusersGGUFLinear
        return component

    runtime = pack_module("pipelines.core.runtime").TorchRuntime(device)
    out = []
    dense = loading.transformer_source(None, paths["bf16"], F32).get()
    runtime.acquire(dense)
    out.append(("dense fp32 (reference)", dense))
    out.append(("bf16 stored, fp32 compute", _acquired(runtime, loading.transformer_source(
        None, paths["bf16"], F32, storage=BF16).get())))
    out.append(("bf16 compute (old bf16 on CPU)", _acquired(runtime, loading.transformer_source(
        None, paths["bf16"], BF16).get())))
    out.append(("Q8_0 diffusers layers (before)", before(gguf_variant("Q8_0", False, "before"))))
    for quant in QUANTS:
        if quant in uncached:
            out.append((f"{quant} EditKit, no cache", gguf_variant(quant, False, f"{quant}-nocache")))
        out.append((f"{quant} EditKit, cache", gguf_variant(quant, True, f"{quant}-cache")))
    if env_cache is None:
        os.environ.pop("EDITKIT_GGUF_CACHE", None)
    else:
        os.environ["EDITKIT_GGUF_CACHE"] = env_cache
    return out


def _acquired(runtime, component):
    runtime.acquire(component)
    return component


def time_calls(paths, size: int, rounds: int, device: torch.device, uncached=QUANTS):
    variants = _variants(paths, device, uncached)
    inputs = {dtype: _inputs(variants[0][1].module.config, size, device, dtype)
              for dtype in (torch.float32, torch.bfloat16)}
    walls = {label: [] for label, _ in variants}
    cpus = {label: [] for label, _ in variants}
    reference = None
    errors = {}
    with torch.inference_mode():
        for round_index in range(rounds + 1):
            for label, component in variants:
                _sync(device)
                wall, cpu = time.perf_counter(), time.process_time()
                output = component.module(**inputs[component.dtype])[0]
                _sync(device)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if round_index == 0:  # warm-up: fills caches, faults in mapped pages
                    if reference is None:
                        reference = output.float()
                    errors[label] = ((output.float() - reference).abs().max() / reference.abs().max()).item()
                    continue
                walls[label].append(wall)
                cpus[label].append(cpu)
    rows = []
    for label, _ in variants:
        rows.append((label, statistics.median(walls[label]), statistics.median(cpus[label]), errors[label]))
    cache_sizes = {label: c.extras["dequant_cache"].used for label, c in variants if "dequant_cache" in c.extras}
    return rows, cache_sizes


# --------------------------------------------------------------------------------------
# Part 2: load memory (fresh process per file)


def measure_load(path: str, how: str) -> dict:
    loading = pack_module("pipelines.flux.loading")
    core_loading = pack_module("pipelines.core.loading")
    import diffusers  # noqa: F401  (imported before the baseline)
    import gguf  # noqa: F401

    baseline = _status_bytes("VmRSS")
    started = time.perf_counter()
    if how == "copied (before)":
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        original = core_loading.read_state_dict

        def copied(p, expected):
            return load_gguf_checkpoint(str(p)) if Path(p).suffix == ".gguf" else original(p, expected)

        loading.read_state_dict = copied
    component = loading.transformer_source(None, Path(path), torch.float32,
                                           storage=torch.bfloat16 if path.endswith(".safetensors") else None).get()
    seconds = time.perf_counter() - started
    after_load = _status_bytes("VmRSS") - baseline
    peak_load = _status_bytes("VmHWM") - baseline
    weights = sum(t.numel() * t.element_size() for t in component.module.state_dict().values())
    quantized = sum(p.numel() * p.element_size() for p in component.module.parameters() if hasattr(p, "quant_type"))
    return {"load_s": seconds, "weights_bytes": weights, "quantized_bytes": quantized, "rss_after_load": after_load,
            "peak_rss_load": peak_load}


# --------------------------------------------------------------------------------------
# Part 3: ComfyUI's executor (child process with ComfyUI's Python)


def _bench_node_class():
    class EditKitBenchInputs:
        """Benchmark-only: fixed random Flux conditioning (T5 512x4096 + pooled 768), a picture and a mask."""

        RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "IMAGE", "MASK")
        FUNCTION = "make"
        CATEGORY = "EditKit/benchmark"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"size": ("INT", {"default": 512})}}

        def make(self, size):
            g = torch.Generator().manual_seed(0)
            states = torch.randn(1, 512, 4096, generator=g)
            pooled = torch.randn(1, 768, generator=g)
            image = torch.rand(1, size, size, 3, generator=g)
            mask = torch.zeros(1, size, size)
            mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
            positive = [[states, {"pooled_output": pooled, "guidance": 30.0}]]
            negative = [[torch.zeros_like(states), {"pooled_output": torch.zeros_like(pooled), "guidance": 30.0}]]
            return positive, negative, image, mask

    class EditKitBenchSink:
        """Benchmark-only output node: takes the sampled LATENT, so a prompt has an output and nothing more."""

        RETURN_TYPES = ()
        FUNCTION = "take"
        OUTPUT_NODE = True
        CATEGORY = "EditKit/benchmark"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"latent": ("LATENT",)}}

        def take(self, latent):
            return {"ui": {"shape": list(latent["samples"].shape)}}

    return EditKitBenchInputs, EditKitBenchSink


def _native_prompt(unet: str, size: int, steps: int, seed: int) -> dict:
    return {
        "1": {"class_type": "EditKitBenchInputs", "inputs": {"size": size}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "4": {"class_type": "InpaintModelConditioning",
              "inputs": {"positive": ["1", 0], "negative": ["1", 1], "vae": ["3", 0], "pixels": ["1", 2],
                         "mask": ["1", 3], "noise_mask": True}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
                         "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["4", 2],
                         "denoise": 1.0}},
        "6": {"class_type": "EditKitBenchSink", "inputs": {"latent": ["5", 0]}},
    }


def _editkit_prompt(unet: str, size: int, steps: int, seed: int) -> dict:
    return {
        "1": {"class_type": "EditKitBenchInputs", "inputs": {"size": size}},
        "2": {"class_type": "EditKitFluxLoader",
              "inputs": {"diffusers_folder": "(none)", "transformer_file": unet, "vae_file": "ae.safetensors",
                         "clip_l_file": "(from folder)", "t5_file": "(from folder)", "weight_dtype": "auto"}},
        "5": {"class_type": "EditKitFluxFillInpaint",
              "inputs": {"model": ["2", 0], "vae": ["2", 2], "conditioning": ["1", 0], "image": ["1", 2],
                         "mask": ["1", 3], "seed": seed, "steps": steps, "guidance": 30.0, "denoise": 1.0,
                         "batch_size": 1}},
        "6": {"class_type": "EditKitBenchSink", "inputs": {"latent": ["5", 1]}},
    }


def comfy_child(comfy_root: str, models: str, size: int, steps: int, runs: int, pytorch_attention: bool) -> dict:
    """Runs inside ComfyUI's Python: alternating native and EditKit runs on the same files."""
    # ComfyUI reads its command line once, when comfy.cli_args is first imported: parse ours first
    # (tests/comfy_inprocess.py then finds the module already imported).
    sys.path.insert(0, comfy_root)
    saved = sys.argv
    sys.argv = [str(Path(comfy_root) / "main.py"), "--cpu", "--disable-api-nodes"]
    if pytorch_attention:
        sys.argv.append("--use-pytorch-cross-attention")
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = saved
    from comfy_inprocess import ComfyInProcess

    comfy = ComfyInProcess.get(comfy_root)
    import nodes

    inputs_node, sink_node = _bench_node_class()
    nodes.NODE_CLASS_MAPPINGS.update({"EditKitBenchInputs": inputs_node, "EditKitBenchSink": sink_node})
    comfy.use_models(Path(models))
    stamps: list[tuple[float, int, int]] = []

    def hook(value, total, preview, node_id=None):
        stamps.append((time.perf_counter(), value, total))

    sys.modules["comfy.utils"].set_progress_bar_global_hook(hook)
    custom = Path(comfy_root) / "custom_nodes"
    have_city96 = any((custom / name).is_dir() for name in ("ComfyUI-GGUF", "comfyui-gguf"))
    setups = [("native bf16 file", _native_prompt, "shallow-fill-bf16.safetensors"),
              ("EditKit bf16 file", _editkit_prompt, "shallow-fill-bf16.safetensors"),
              ("EditKit GGUF Q8_0", _editkit_prompt, "shallow-fill-Q8_0.gguf")]
    results: dict[str, dict] = {label: {"s_per_step": [], "peak_rss": []} for label, _, _ in setups}
    for run in range(runs + 1):
        for label, build, unet in setups:
            stamps.clear()
            before = _status_bytes("VmRSS")
            _reset_peak_rss()
            outcome = comfy.run(build(unet, size, steps, seed=1000 + run))
            if not outcome.success:
                raise RuntimeError(f"{label}: {outcome.error()}")
            peak = _status_bytes("VmHWM") - before
            sampler = [t for t, _value, total in stamps if total == steps]
            if run == 0:  # warm-up run: loads the models
                continue
            intervals = [b - a for a, b in zip(sampler, sampler[1:])]
            results[label]["s_per_step"].append(statistics.median(intervals))
            results[label]["peak_rss"].append(peak)
    return {"results": results, "city96": have_city96}


def run_comfyui(args, scratch: Path, paths: dict[str, Path]) -> list[dict] | str:
    root = Path(args.comfyui)
    if not (root / "execution.py").is_file():
        return f"no ComfyUI at {root} (pass --comfyui)"
    models = scratch / "comfy-models"
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (models / "vae").mkdir(parents=True, exist_ok=True)
    for key in ("bf16", "Q8_0"):
        target = models / "diffusion_models" / paths[key].name
        if not target.exists():
            os.link(paths[key], target)
    write_vae(models / "vae" / "ae.safetensors")
    reports = []
    for pytorch_attention in (False, True):
        cmd = [args.comfy_python, __file__, "--comfy-child", str(root), "--models", str(models), "--size",
               str(args.size), "--steps", str(args.steps), "--runs", str(args.runs)]
        if pytorch_attention:
            cmd.append("--pytorch-attention")
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            return f"ComfyUI child failed: {out.stderr[-2000:]}"
        report = json.loads(out.stdout.strip().splitlines()[-1])
        report["attention"] = "--use-pytorch-cross-attention" if pytorch_attention else "default"
        reports.append(report)
    return reports


# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 16)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the calls part")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="calls,load,comfyui")
    parser.add_argument("--uncached", default=",".join(QUANTS),
                        help="GGUF types also timed with the dequantized-layer cache off")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_ROOT", "/tmp/comfy/ComfyUI"))
    parser.add_argument("--comfy-python", default=os.environ.get("COMFYUI_PYTHON", "/tmp/comfy/venv/bin/python"))
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per ComfyUI run")
    parser.add_argument("--runs", type=int, default=4, help="timed ComfyUI runs per setup (plus one warm-up)")
    parser.add_argument("--measure-load", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--comfy-child", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--pytorch-attention", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    offline()
    if args.measure_load:
        print(json.dumps(measure_load(*args.measure_load)))
        return 0
    if args.comfy_child:
        print(json.dumps(comfy_child(args.comfy_child, args.models, args.size, args.steps, args.runs,
                                     args.pytorch_attention)))
        return 0

    parts = set(args.parts.split(","))
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        paths = write_files(scratch / "files")
        if "calls" in parts:
            rows, caches = time_calls(paths, args.size, args.rounds, device, args.uncached.split(","))
            reference_wall, reference_cpu = rows[0][1], rows[0][2]
            print(f"\nOne transformer call = one Fill step ({args.size}x{args.size}, 512 text tokens, {device}, "
                  f"{args.rounds} alternating rounds, torch threads {torch.get_num_threads()}):")
            print(f"{'weights':34s} {'wall s':>8s} {'ratio':>6s} {'CPU s':>8s} {'ratio':>6s} {'max rel err':>12s}")
            for label, wall, cpu, err in rows:
                print(f"{label:34s} {wall:8.3f} {wall / reference_wall:6.3f} {cpu:8.3f} {cpu / reference_cpu:6.3f} "
                      f"{err:12.2e}")
            for label, used in caches.items():
                print(f"  cache of '{label}': {used / 2**20:.0f} MiB")
        if "load" in parts:
            print("\nLoading the shallow transformer (fresh process each; RSS above the RSS after imports):")
            print(f"{'file / read':34s} {'quantized MiB':>14s} {'weights MiB':>12s} {'RSS after MiB':>14s} "
                  f"{'peak MiB':>9s} {'peak/quant':>11s} {'load s':>7s}")
            for label, path, how in (("GGUF Q8_0, mapped (EditKit now)", paths["Q8_0"], "mapped"),
                                     ("GGUF Q8_0, copied (before)", paths["Q8_0"], "copied (before)"),
                                     ("bf16 .safetensors, bf16 stored", paths["bf16"], "dense")):
                out = subprocess.run([sys.executable, __file__, "--measure-load", str(path), how],
                                     capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                quant = row["quantized_bytes"] or row["weights_bytes"]
                print(f"{label:34s} {row['quantized_bytes'] / 2**20:14.0f} {row['weights_bytes'] / 2**20:12.0f} "
                      f"{row['rss_after_load'] / 2**20:14.0f} {row['peak_rss_load'] / 2**20:9.0f} "
                      f"{row['peak_rss_load'] / quant:11.2f} {row['load_s']:7.2f}")
        if "comfyui" in parts:
            reports = run_comfyui(args, scratch, paths)
            print(f"\nComfyUI's executor, --cpu, {args.size}x{args.size}, {args.steps} steps, {args.runs} runs per "
                  "setup alternating (after one warm-up run each):")
            if isinstance(reports, str):
                print(f"  skipped: {reports}")
            else:
                for report in reports:
                    results = report["results"]
                    native = statistics.median(results["native bf16 file"]["s_per_step"])
                    print(f"  attention: {report['attention']}")
                    print(f"  {'setup':24s} {'s/step':>8s} {'vs native':>10s} {'sampling peak RSS MiB':>22s}")
                    for label, values in results.items():
                        step = statistics.median(values["s_per_step"])
                        peak = statistics.median(values["peak_rss"]) / 2**20
                        print(f"  {label:24s} {step:8.3f} {step / native:10.3f} {peak:22.0f}")
                    if not report["city96"]:
                        print("  city96 ComfyUI-GGUF: skipped (not installed in this ComfyUI's custom_nodes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
