"""GPU check for when a GPU is available: every family at real size, random weights, 1024², inside ComfyUI's memory manager.

For each family (FLUX.1-Fill, FLUX.1-dev, Kontext-inpaint, Qwen-Image-Edit-2509 with 2 pictures, Qwen-Image-Layered,
Z-Image-Turbo, the FLUX.1 and Qwen-Image VAEs, BEN2, T5-XXL, Qwen2.5-VL) and each memory mode:

* ``normal``: ComfyUI's defaults on the whole card;
* ``lowvram``: ComfyUI's ``--lowvram``;
* ``cap24`` / ``cap12``: the process capped at 24 GB / 12 GB with ``torch.cuda.set_per_process_memory_fraction``,
  and ComfyUI told the same (``--reserve-vram`` = card - cap), as on a 24 GB / 12 GB card;

a fresh process builds the model with random weights (bf16), hands it to EditKit's ``ComfyRuntime`` (the patcher
that ComfyUI's ``load_models_gpu`` partially loads and streams), runs ``--steps`` forward passes at 1024² and
prints peak VRAM (``torch.cuda.max_memory_allocated``), seconds per step, how much ComfyUI loaded, and the MFU:
the step's FLOPs (counted once by ``torch.utils.flop_counter.FlopCounterMode``: matmuls and attention) over
seconds per step times the card's dense bf16 peak (``--peak-tflops``, else a table of data-centre cards). A
family that does not finish prints its error (e.g. out of memory). Qwen-Image-Edit must finish under both caps.

Mode ``native`` (issue 23) is the peer on the same weights: ComfyUI's own model of that family built from the
same random state dict (converted to ComfyUI's key layout) by ``comfy.sd.load_diffusion_model_state_dict``,
loaded by ComfyUI and run on the same inputs, for the families ComfyUI 0.3.64 has a model for (FLUX.1-Fill,
FLUX.1-dev, Qwen-Image-Edit; not Kontext-inpaint's widened Fill, Layered, Z-Image or FLUX.2). Its row follows the
family's ``normal`` row, with the ratio of their s/step (EditKit / native) in the last column.

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
MODES = ("normal", "lowvram", "cap24", "cap12", "native")
NATIVE = ("flux_fill", "flux_dev", "qwen_edit")
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "B200": 2250.0}
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
    if mode == "native":
        argv.append("--use-pytorch-cross-attention")  # the best native configuration measured (README)
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


def _native_step(family: str, module, device):
    """ComfyUI's own model of ``family`` holding ``module``'s weights, loaded by ComfyUI, and one step of it on the
    inputs :func:`_inputs` gives EditKit (ComfyUI's latent layout: Flux ``[B, C, H/8, W/8]`` with Fill's mask and
    picture as ``c_concat`` channels; Qwen ``[B, 16, 1, H/8, W/8]`` with the 2 pictures as ``ref_latents``)."""
    import comfy.model_management as mm
    import comfy.sd
    import torch

    from editkit.pipelines.flux.layout import diffusers_transformer_to_bfl

    bf16 = torch.bfloat16
    sd = module.state_dict()
    sd = diffusers_transformer_to_bfl(sd) if family.startswith("flux") else dict(sd)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": bf16})
    del sd
    mm.load_models_gpu([patcher])
    native = patcher.model.diffusion_model
    side = SIDE // 8
    t = torch.tensor([0.5], device=device, dtype=bf16)
    if family.startswith("flux"):
        channels = module.config.in_channels // 4
        x = torch.randn(1, channels, side, side, device=device, dtype=bf16)
        context = torch.randn(1, 512, 4096, device=device, dtype=bf16)
        y = torch.randn(1, 768, device=device, dtype=bf16)
        guidance = torch.tensor([3.5], device=device, dtype=bf16)
        return patcher, lambda: native(x, t, context, y=y, guidance=guidance)
    x = torch.randn(1, 16, 1, side, side, device=device, dtype=bf16)
    refs = [torch.randn(1, 16, 1, side, side, device=device, dtype=bf16) for _ in range(2)]
    context = torch.randn(1, 300, module.config.joint_attention_dim, device=device, dtype=bf16)
    return patcher, lambda: native(x, t, context, ref_latents=refs)


def _peak_tflops(override: float | None) -> float:
    import torch

    if override:
        return override
    if not torch.cuda.is_available():
        return float("nan")
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def run_one(family: str, mode: str, steps: int, layers: int | None, peak_tflops: float | None = None) -> dict:
    _comfy(mode)
    import comfy.model_management as mm
    import torch

    from packload import load_pack, offline

    offline()
    load_pack()
    from torch.utils.flop_counter import FlopCounterMode

    from editkit.nodes import comfy_bridge
    from editkit.pipelines.core.runtime import Component

    module, kind = _build(family, layers)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if mode == "native":
        if family not in NATIVE:
            raise SystemExit(f"ComfyUI 0.3.64 has no native model for {family}")
        patcher, step = _native_step(family, module, mm.get_torch_device())
        del module  # ComfyUI's model holds the weights now
    else:
        component = Component(module, kind, family, torch.bfloat16)
        runtime = comfy_bridge.ComfyRuntime()
        device = runtime.acquire(component, memory_required=2 * 2**30)
        patcher = runtime.patcher(component)
        step = _inputs(family, module, device)
    times = []
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:  # the first step warms up and counts the FLOPs
            step()
        for _ in range(steps):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    per_step = sorted(times)[len(times) // 2]
    flops = counter.get_total_flops()
    return {"family": family, "mode": mode, "model_GB": patcher.model_size() / 1e9,
            "loaded_GB": patcher.loaded_size() / 1e9, "peak_vram_GB": torch.cuda.max_memory_allocated() / 1e9
            if cuda else float("nan"), "s_per_step": per_step, "tflop_per_step": flops / 1e12,
            "mfu": flops / per_step / (_peak_tflops(peak_tflops) * 1e12), "vram_state": mm.vram_state.name}


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
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak for the MFU column (default: looked up by name)")
    args = parser.parse_args(argv)
    SIDE = args.side
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.layers, args.peak_tflops)))
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print(f"{'family':16} {'mode':8} {'model GB':>8} {'loaded GB':>9} {'peak VRAM GB':>12} {'s/step':>7} "
          f"{'TFLOP/step':>10} {'MFU':>6} {'/native':>7}")
    normal: dict[str, float] = {}
    failed = 0
    for family in args.families:
        for mode in args.modes:
            if mode == "native" and family not in NATIVE:
                continue
            cmd = [sys.executable, __file__, "--one", family, mode, "--steps", str(args.steps), "--side", str(SIDE)]
            if args.layers is not None:
                cmd += ["--layers", str(args.layers)]
            if args.peak_tflops:
                cmd += ["--peak-tflops", str(args.peak_tflops)]
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
            if mode == "normal":
                normal[family] = r["s_per_step"]
            ratio = f"{normal[family] / r['s_per_step']:7.3f}" if mode == "native" and family in normal else ""
            print(f"{family:16} {mode:8} {r['model_GB']:8.1f} {r['loaded_GB']:9.1f} {r['peak_vram_GB']:12.1f} "
                  f"{r['s_per_step']:7.2f} {r['tflop_per_step']:10.1f} {r['mfu']:6.1%} {ratio:>7}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
