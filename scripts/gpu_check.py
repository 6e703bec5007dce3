"""GPU check for when a GPU is available: every family at real size, random weights, 1024², inside ComfyUI's memory manager.

For each family (FLUX.1-Fill, FLUX.1-dev, Kontext-inpaint, Qwen-Image-Edit-2509 with 2 pictures, Qwen-Image-Layered,
Z-Image-Turbo, the FLUX.1 and Qwen-Image VAEs, BEN2, T5-XXL, Qwen2.5-VL) and each memory mode:

* ``normal``: ComfyUI's defaults on the whole card;
* ``lowvram``: ComfyUI's ``--lowvram``;
* ``cap24`` / ``cap12``: the process capped at 24 GB / 12 GB with ``torch.cuda.set_per_process_memory_fraction``,
  and ComfyUI told the same (``--reserve-vram`` = card - cap), as on a 24 GB / 12 GB card;

a fresh process builds the model with random weights (bf16), hands it to EditKit's ``ComfyRuntime`` (the patcher
that ComfyUI's ``load_models_gpu`` partially loads and streams), runs ``--steps`` forward passes at 1024² and
prints peak VRAM (``torch.cuda.max_memory_allocated``), seconds per step and how much ComfyUI loaded. A
family that does not finish prints its error (e.g. out of memory). Qwen-Image-Edit must finish under both caps.

One command (needs ``COMFYUI_ROOT`` = a ComfyUI 0.3.64 checkout and a CUDA GPU)::

    COMFYUI_ROOT=/path/to/ComfyUI python scripts/gpu_check.py                 # everything, ~20-40 min on an H100
    COMFYUI_ROOT=... python scripts/gpu_check.py --families qwen_edit zimage --modes cap24 cap12

``--layers 1 --side 256 --steps 1 --modes normal`` is a quick check of the script itself (also on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

FAMILIES = ("flux_fill", "flux_dev", "kontext_inpaint", "qwen_edit", "qwen_layered", "zimage", "flux_vae", "qwen_vae",
            "ben2", "t5_xxl", "qwen25_vl")
MODES = ("normal", "lowvram", "cap24", "cap12")
SIDE = 1024


def _comfy(mode: str):
    """Import ComfyUI with the mode's flags (they are read at import)."""
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        sys.exit("set COMFYUI_ROOT to a ComfyUI checkout")
    import torch

    argv = [str(Path(root) / "main.py"), "--disable-api-nodes"]
    if not torch.cuda.is_available():
        argv.append("--cpu")
    if mode == "lowvram":
        argv.append("--lowvram")
    if mode.startswith("cap") and torch.cuda.is_available():
        cap = int(mode[3:]) * 2**30
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        argv += ["--reserve-vram", f"{max(0.0, (total - cap) / 2**30):.2f}"]
    sys.path.insert(0, root)
    sys.argv = argv
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management as mm  # noqa: F401  (reads the flags)


def _build(family: str, layers: int | None):
    """The real-size model (``layers`` blocks when given) with random bf16 weights, built without an fp32 copy."""
    import torch
    from accelerate import init_empty_weights
    from test_streaming import FAMILIES as SPECS  # the same builders the streaming tests use

    spec = SPECS[family]
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers and rope tables computed
        module = spec.build("full" if layers is None else "shallow")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in module.modules():
            for name, param in list(layer._parameters.items()):
                if param is not None and param.device.type == "meta":
                    data = torch.empty(param.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
                    layer._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    return module.to(torch.bfloat16).eval(), spec.kind


def _inputs(family: str, module, device):
    """A function running one step at 1024² (Qwen edit: the output plus 2 pictures)."""
    import torch

    from editkit.pipelines.flux.flow import text_ids, token_ids

    bf16 = torch.bfloat16
    c = getattr(module, "config", None)
    if family in ("flux_fill", "flux_dev", "kontext_inpaint"):
        n = (SIDE // 16) ** 2
        args = dict(hidden_states=torch.randn(1, n, c.in_channels), encoder_hidden_states=torch.randn(1, 512, 4096),
                    pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]))
        args = {k: v.to(device, bf16) for k, v in args.items()}
        return lambda: module(**args, txt_ids=text_ids(512, device), img_ids=token_ids(SIDE // 8, SIDE // 8, 0, device),
                              return_dict=False)[0]
    if family in ("qwen_edit", "qwen_layered"):
        side = SIDE // 16
        frames = 3 if family == "qwen_edit" else 5  # edit: output + 2 pictures; layered: 4 layers + the picture
        hidden = torch.randn(1, frames * side * side, c.in_channels, device=device, dtype=bf16)
        text = torch.randn(1, 300, c.joint_attention_dim, device=device, dtype=bf16)
        extra = {"additional_t_cond": torch.zeros(1, dtype=torch.long, device=device)} if family == "qwen_layered" else {}
        return lambda: module(hidden_states=hidden, timestep=torch.tensor([0.5], device=device, dtype=bf16),
                              encoder_hidden_states=text, encoder_hidden_states_mask=None,
                              img_shapes=[[(1, side, side)] * frames], return_dict=False, **extra)[0]
    if family == "zimage":
        latents = [torch.randn(16, 1, SIDE // 8, SIDE // 8, device=device, dtype=bf16)]
        caps = [torch.randn(128, c.cap_feat_dim, device=device, dtype=bf16)]
        return lambda: module(latents, torch.tensor([0.5], device=device), caps, return_dict=False)[0]
    if family == "flux_vae":
        z = torch.randn(1, 16, SIDE // 8, SIDE // 8, device=device, dtype=bf16)
        return lambda: module.decode(z).sample
    if family == "qwen_vae":
        z = torch.randn(1, 16, 1, SIDE // 8, SIDE // 8, device=device, dtype=bf16)
        return lambda: module.decode(z, return_dict=False)[0]
    if family == "ben2":
        image = torch.rand(1, 3, SIDE, SIDE, device=device, dtype=bf16)
        return lambda: module(image)
    ids = torch.arange(512 if family == "t5_xxl" else 1024, device=device).unsqueeze(0) % 1000
    return lambda: module(input_ids=ids).last_hidden_state


def run_one(family: str, mode: str, steps: int, layers: int | None) -> dict:
    _comfy(mode)
    import comfy.model_management as mm
    import torch

    from packload import load_pack, offline

    offline()
    load_pack()
    from editkit.nodes import comfy_bridge
    from editkit.pipelines.core.runtime import Component

    module, kind = _build(family, layers)
    component = Component(module, kind, family, torch.bfloat16)
    runtime = comfy_bridge.ComfyRuntime()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    device = runtime.acquire(component, memory_required=2 * 2**30)
    patcher = runtime.patcher(component)
    step = _inputs(family, module, device)
    times = []
    with torch.inference_mode():
        for _ in range(steps + 1):  # the first step warms up
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return {"family": family, "mode": mode, "model_GB": patcher.model_size() / 1e9,
            "loaded_GB": patcher.loaded_size() / 1e9, "peak_vram_GB": torch.cuda.max_memory_allocated() / 1e9
            if cuda else float("nan"), "s_per_step": times[len(times) // 2], "vram_state": mm.vram_state.name}


def main(argv=None) -> int:
    global SIDE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="keep one block (quick check of the script)")
    parser.add_argument("--side", type=int, default=SIDE, help="picture side (1024; smaller for a quick check)")
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per family and mode")
    args = parser.parse_args(argv)
    SIDE = args.side
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.layers)))
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print(f"{'family':16} {'mode':8} {'model GB':>8} {'loaded GB':>9} {'peak VRAM GB':>12} {'s/step':>7}")
    failed = 0
    for family in args.families:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--one", family, mode, "--steps", str(args.steps), "--side", str(SIDE)]
            if args.layers is not None:
                cmd += ["--layers", str(args.layers)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{family:16} {mode:8} timed out after {args.timeout} s")
                failed += 1
                continue
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"{family:16} {mode:8} FAILED: {last[:150]}")
                failed += 1
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{family:16} {mode:8} {r['model_GB']:8.1f} {r['loaded_GB']:9.1f} {r['peak_vram_GB']:12.1f} "
                  f"{r['s_per_step']:7.2f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
