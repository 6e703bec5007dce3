"""Benchmark Qwen-Image-Edit-2509 (and -2511) in EditKit against diffusers (not a test; prints a table).

    python scripts/benchmark_qwen_image.py [--size 512] [--layers 1] [--steps 2] [--text-tokens 200]
                                           [--skip-steps] [--skip-encode] [--skip-memory]
                                           [--compare-2511 [--rounds 2]]

Sampling
    A real-width but shallow Qwen-Image transformer (24 heads x 128 = 3072 wide, joint width 3584 as
    Qwen2.5-VL-7B's states, ``--layers`` blocks instead of 60; every layer has its real size, so the cost
    per block is Qwen-Image's) edits one ``--size``² picture with true CFG (``true_cfg_scale`` 4, so two
    transformer passes per step) in three ways on the same weights, noise and prompt states: diffusers'
    ``QwenImageEditPlusPipeline`` (its two passes run one after the other), EditKit with the two passes
    batched into one call, and EditKit unbatched. The picture's reference copy is ``--size``² in all
    three (diffusers' ``VAE_IMAGE_SIZE`` set to it; EditKit's "custom" reference size), so the transformer
    sees the same tokens. Prompt states are fixed random tensors of Qwen's width, the negative shorter
    than the prompt (EditKit pads and masks it when batching). The VAE is the tiny test VAE: only the
    steps are timed, from the pipelines' own per-step callbacks. On the CPU the primary figure is CPU time
    per step (``time.process_time``, which other jobs on a shared machine barely disturb), with wall time
    beside it.

2511 against 2509 (``--compare-2511``)
    The same shallow transformer weights with diffusers' ``zero_cond_t`` off (2509) and on (2511, whose
    reference tokens get a second, timestep-0 modulation), through EditKit's edit (true CFG as the CPU default:
    two calls per step) and, for 2511, diffusers' ``QwenImageEditPlusPipeline``; ``--rounds`` rounds in
    alternating order, median CPU time per step, ratios against EditKit's 2509 step of the same process, and
    the largest difference between EditKit's and diffusers' 2511 pictures.

Prompt encoding
    The tiny Qwen2.5-VL of the tests (its real vocabulary and 8-block vision tower, 128 wide) encodes an
    instruction with 1 and with 3 pictures at the 384² vision-language size, then the same again (EditKit's
    cache: what a re-run with another seed costs).

Memory
    The shallow transformer is written as ComfyUI's bf16 ``.safetensors`` and as a GGUF Q8_0; a fresh
    process loads each through EditKit's loader and reports its resident memory growth after loading and
    after one transformer call (GGUF stays quantized; its file is mapped, so only pages that were read count).
"""

from __future__ import annotations

import argparse
import json
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

SEED = 1234
SHALLOW = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=24,
               joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))


def shallow_transformer(layers: int):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(SEED)
    return QwenImageTransformer2DModel(num_layers=layers, **SHALLOW).eval().requires_grad_(False)


class PrecomputedPrompts:
    """Stands in for the text encoder in the step benchmark: the same fixed states for both pipelines."""

    def __init__(self, states: dict[str, torch.Tensor]):
        self.states = states

    def encode(self, prompt, pictures, variant, runtime):
        return self.states[prompt]


class StepClock:
    """CPU and wall time at every step boundary (step callbacks of either pipeline call ``tick``)."""

    def __init__(self):
        self.marks = [(time.process_time(), time.perf_counter())]

    def tick(self, *_args, **_kwargs):
        self.marks.append((time.process_time(), time.perf_counter()))
        return {}

    def per_step(self) -> list[tuple[float, float]]:
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:])]


def bench_steps(args) -> list[tuple[str, list]]:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
    import numpy as np
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image
    from qwen_image_models import tiny_components

    core = pack_module("pipelines.core.runtime")
    loading = pack_module("pipelines.qwen_image.loading")
    sizes = pack_module("pipelines.qwen_image.sizes")
    edit_module = pack_module("pipelines.qwen_image.edit")
    components = tiny_components()
    transformer = shallow_transformer(args.layers)
    vae = components["vae"]
    schedule = loading.scheduler_config(None)
    g = torch.Generator().manual_seed(SEED)
    cond = torch.randn(1, args.text_tokens, 3584, generator=g)
    uncond = torch.randn(1, max(8, args.text_tokens // 8), 3584, generator=g)
    array = np.random.default_rng(SEED).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    pil = Image.fromarray(array)
    pixels = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    component = core.Component(transformer, "diffusion", "shallow", torch.float32)
    vae_component = core.Component(vae, "vae", "tiny", torch.float32)
    prompts = PrecomputedPrompts({"edit": cond, " ": uncond})

    def diffusers_run():
        clock = StepClock()
        pipe = QwenImageEditPlusPipeline(scheduler=components["scheduler"], vae=vae, text_encoder=None, tokenizer=None,
                                         processor=None, transformer=transformer)
        plus.VAE_IMAGE_SIZE = args.size * args.size
        clock.marks.clear()
        with torch.inference_mode():
            clock.tick()
            out = pipe(image=[pil], prompt_embeds=cond, negative_prompt_embeds=uncond, true_cfg_scale=4.0,
                       height=args.size, width=args.size, num_inference_steps=args.steps + 1,
                       generator=torch.Generator().manual_seed(SEED), output_type="pt",
                       callback_on_step_end=lambda *a: clock.tick())
        return clock, out.images

    def editkit_run(batched: bool):
        clock = StepClock()
        runtime = core.TorchRuntime("cpu", on_progress=lambda *a: clock.tick())
        clock.marks.clear()
        clock.tick()
        result = edit_module.edit(
            component, prompts, vae_component, [pixels], "edit", runtime, scheduler_config=schedule,
            negative_prompt=" ", true_cfg_scale=4.0, steps=args.steps + 1, seed=SEED, cfg_batched=batched,
            output=sizes.OutputSize(sizes.EXPLICIT, args.size, args.size, 64.0),
            references=sizes.ReferenceSizes(sizes.CUSTOM, 384 * 384, args.size * args.size),
        )
        return clock, result.images

    runs = {"diffusers QwenImageEditPlusPipeline (2 calls/step)": lambda: diffusers_run(),
            "EditKit, true CFG batched (1 call/step)": lambda: editkit_run(True),
            "EditKit, true CFG unbatched (2 calls/step)": lambda: editkit_run(False)}
    results, images = [], {}
    for name, run in runs.items():
        clock, image = run()
        # The first span also holds the preparation (VAE encode, prompts): one extra step is run and dropped.
        steps = clock.per_step()[1:]
        results.append((name, steps))
        images[name] = image
    first = next(iter(images.values()))
    diffs = {name: float((image - first).abs().max()) for name, image in images.items()}
    return results, diffs


def bench_2511(args) -> tuple[dict[str, float], float]:
    """Median CPU s/step of EditKit 2509, EditKit 2511 and diffusers 2511 (alternating rounds); 2511 max |diff|."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
    import numpy as np
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from PIL import Image
    from qwen_image_models import tiny_components

    core = pack_module("pipelines.core.runtime")
    loading = pack_module("pipelines.qwen_image.loading")
    sizes = pack_module("pipelines.qwen_image.sizes")
    edit_module = pack_module("pipelines.qwen_image.edit")
    components = tiny_components()
    base = shallow_transformer(args.layers)
    zero = QwenImageTransformer2DModel(num_layers=args.layers, zero_cond_t=True, **SHALLOW).eval().requires_grad_(False)
    zero.load_state_dict(base.state_dict())
    vae = core.Component(components["vae"], "vae", "tiny", torch.float32)
    g = torch.Generator().manual_seed(SEED)
    cond = torch.randn(1, args.text_tokens, 3584, generator=g)
    uncond = torch.randn(1, max(8, args.text_tokens // 8), 3584, generator=g)
    array = np.random.default_rng(SEED).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    pixels = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    prompts = PrecomputedPrompts({"edit": cond, " ": uncond})
    plus.VAE_IMAGE_SIZE = args.size * args.size

    def editkit(model, variant):
        clock = StepClock()
        runtime = core.TorchRuntime("cpu", on_progress=lambda *a: clock.tick())
        clock.marks.clear()
        clock.tick()
        result = edit_module.edit(
            core.Component(model, "diffusion", variant, torch.float32), prompts, vae, [pixels], "edit", runtime,
            scheduler_config=loading.scheduler_config(None), negative_prompt=" ", true_cfg_scale=4.0,
            steps=args.steps + 1, seed=SEED, cfg_batched=False, variant=variant,
            output=sizes.OutputSize(sizes.EXPLICIT, args.size, args.size, 64.0),
            references=sizes.ReferenceSizes(sizes.CUSTOM, 384 * 384, args.size * args.size))
        return clock, result.images

    def diffusers_2511():
        clock = StepClock()
        pipe = QwenImageEditPlusPipeline(scheduler=components["scheduler"], vae=components["vae"], text_encoder=None,
                                         tokenizer=None, processor=None, transformer=zero)
        clock.marks.clear()
        with torch.inference_mode():
            clock.tick()
            out = pipe(image=[Image.fromarray(array)], prompt_embeds=cond, negative_prompt_embeds=uncond,
                       true_cfg_scale=4.0, height=args.size, width=args.size, num_inference_steps=args.steps + 1,
                       generator=torch.Generator().manual_seed(SEED), output_type="pt",
                       callback_on_step_end=lambda *a: clock.tick())
        return clock, out.images

    runs = {"EditKit 2509 (zero_cond_t off)": lambda: editkit(base, loading.EDIT_2509),
            "EditKit 2511 (zero_cond_t on)": lambda: editkit(zero, loading.EDIT_2511),
            "diffusers 2511 QwenImageEditPlusPipeline": diffusers_2511}
    steps: dict[str, list[float]] = {name: [] for name in runs}
    images = {}
    for round_ in range(args.rounds):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            clock, images[name] = runs[name]()
            steps[name] += [cpu for cpu, _ in clock.per_step()[1:]]  # the first span holds the preparation
    diff = float((images["EditKit 2511 (zero_cond_t on)"] - images["diffusers 2511 QwenImageEditPlusPipeline"])
                 .abs().max())
    return {name: statistics.median(values) for name, values in steps.items()}, diff


def bench_encode() -> list[tuple[str, float, float]]:
    from qwen_image_models import tiny_components

    sizes = pack_module("pipelines.qwen_image.sizes")
    text = pack_module("pipelines.qwen_image.text")
    core = pack_module("pipelines.core.runtime")
    components = tiny_components()
    encoder = text.QwenTextEncoder(
        core.Component(components["text_encoder"].model, "text_encoder", "tiny", torch.float32),
        components["tokenizer"], components["processor"].image_processor)
    runtime = core.TorchRuntime("cpu")
    g = torch.Generator().manual_seed(SEED)
    pictures = [sizes.vl_copy(torch.rand(1, 3, 512, 512, generator=g), 384, 384) for _ in range(3)]
    encoder.encode("warm up", pictures[:1], "Qwen-Image-Edit-2509", runtime)  # first-call costs out of the table
    rows = []
    for count in (1, 3):
        for label in ("first run", "cached re-run"):
            cpu, wall = time.process_time(), time.perf_counter()
            states = encoder.encode("change the blue tracksuit to red", pictures[:count], "Qwen-Image-Edit-2509",
                                    runtime)
            rows.append((f"{count} picture(s), {label} ({states.shape[1]} tokens)", time.process_time() - cpu,
                         time.perf_counter() - wall))
    return rows


MEMORY_CHILD = r"""
import json, sys, gc
sys.path.insert(0, sys.argv[1] + "/scripts")
from packload import offline, pack_module
offline()
import torch
from pathlib import Path

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
loading = pack_module("pipelines.qwen_image.loading")
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[3]]
gc.collect()
before = rss()
component = loading.transformer_source(None, Path(sys.argv[2]), dtype).get()
loaded = rss()
g = torch.Generator().manual_seed(0)
with torch.inference_mode():
    component.module(hidden_states=torch.randn(1, 512, 64, generator=g).to(dtype),
                     encoder_hidden_states=torch.randn(1, 32, 3584, generator=g).to(dtype),
                     timestep=torch.tensor([0.5]), img_shapes=[[(1, 16, 16), (1, 16, 16)]], return_dict=False)
after = rss()
weights = sum(t.numel() * t.element_size() for t in component.module.state_dict().values())
print(json.dumps({"load": loaded - before, "after_call": after - before, "weights": weights}))
"""


def bench_memory(args) -> list[tuple[str, int, int, int, int]]:
    from qwen_image_models import _save, transformer_to_comfy, write_gguf

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = shallow_transformer(args.layers)
        sd = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
        del model
        files = {"bf16 .safetensors (ComfyUI layout)": Path(tmp) / "qwen_image_edit_2509_bf16.safetensors",
                 "GGUF Q8_0": Path(tmp) / "Qwen-Image-Edit-2509-Q8_0.gguf"}
        _save(transformer_to_comfy(sd), files["bf16 .safetensors (ComfyUI layout)"], torch.bfloat16)
        write_gguf(sd, files["GGUF Q8_0"])
        del sd
        for name, path in files.items():
            dtype = "bf16" if path.suffix == ".safetensors" else "fp32"
            out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(ROOT), str(path), dtype], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            measured = json.loads(out)
            rows.append((name, path.stat().st_size, measured["weights"], measured["load"], measured["after_call"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="output and reference picture side (multiple of 16)")
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks (Qwen-Image has 60)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (one more is run and not timed)")
    parser.add_argument("--text-tokens", type=int, default=200, help="prompt length in tokens (negative: 1/8)")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-encode", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--compare-2511", action="store_true",
                        help="only the 2511 (zero_cond_t) against 2509 step comparison")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of --compare-2511")
    args = parser.parse_args(argv)
    offline()
    out = sys.stdout.write
    out(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if args.compare_2511:
        medians, diff = bench_2511(args)
        out(f"\n## 2511 vs 2509: shallow Qwen-Image ({args.layers} block(s), 3072 wide), {args.size}² output + "
            f"{args.size}² reference, {args.text_tokens} text tokens, true CFG 4 (two calls/step), "
            f"{args.rounds} alternating rounds x {args.steps} steps\n")
        out("| pipeline | CPU s/step (median) | ratio vs EditKit 2509 |\n|---|---|---|\n")
        reference = medians["EditKit 2509 (zero_cond_t off)"]
        for name, cpu in medians.items():
            out(f"| {name} | {cpu:.2f} | {cpu / reference:.3f} |\n")
        out(f"\nEditKit 2511 vs diffusers 2511: max |diff| {diff:.2e}\n")
        return 0
    if not args.skip_steps:
        results, diffs = bench_steps(args)
        tokens = (args.size // 16) ** 2
        out(f"\n## Sampling: shallow Qwen-Image ({args.layers} block(s), 3072 wide, joint 3584), {args.size}² output "
            f"+ {args.size}² reference = {2 * tokens} image tokens, {args.text_tokens} text tokens, true CFG 4\n")
        out("| pipeline | CPU s/step (median) | wall s/step (median) | CPU ratio vs diffusers | max |diff| vs diffusers |\n")
        out("|---|---|---|---|---|\n")
        base = statistics.median(c for c, _ in results[0][1])
        for name, steps in results:
            cpu = statistics.median(c for c, _ in steps)
            wall = statistics.median(w for _, w in steps)
            out(f"| {name} | {cpu:.2f} | {wall:.2f} | {cpu / base:.3f} | {diffs[name]:.2e} |\n")
    if not args.skip_encode:
        out("\n## Prompt encoding with pictures (tiny Qwen2.5-VL, 384² vision copies)\n")
        out("| case | CPU s | wall s |\n|---|---|---|\n")
        for name, cpu, wall in bench_encode():
            out(f"| {name} | {cpu:.3f} | {wall:.3f} |\n")
    if not args.skip_memory:
        out(f"\n## Resident memory of the shallow transformer ({args.layers} block(s))\n")
        out("| file | size on disk | weights held by the model | RSS after load | RSS after one call (512 tokens) |\n"
            "|---|---|---|---|---|\n")
        for name, size, weights, load, call in bench_memory(args):
            out(f"| {name} | {size / 2**20:.0f} MiB | {weights / 2**20:.0f} MiB | {load / 2**20:.0f} MiB | "
                f"{call / 2**20:.0f} MiB |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
