"""``python -m pipelines zimage``: the progressive recipe for one prompt or a batch of prompts, without ComfyUI.

    python -m pipelines zimage --models-dir ComfyUI/models --config stages.yaml \\
        --prompt "portrait of a sailor" --seed 7 --out sailor.png
    python -m pipelines zimage --models-dir ComfyUI/models --prompts tweets.jsonl --out pictures/

A batch file is plain text (one prompt per line; blank lines and lines starting with ``#`` are skipped)
or JSON Lines (``.jsonl``: ``{"prompt": ..., "seed": 7, "negative_prompt": ..., "name": ...}``, every key
but ``prompt`` optional). Line ``k`` (0-based among prompt lines) uses ``--seed + k`` unless it names a
seed, and is written to ``<out>/<name or k>.png``. Every line is checked before the first picture is
made: with ``--on-bad-line skip`` (the default) bad lines are reported and the others generated; with
``stop`` nothing is generated. Pictures are written whole (to a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import EditKitError

DTYPES = ("auto", "bf16", "fp16", "fp32")


def _say(message: str) -> None:
    """CLI output goes to stderr, so stdout stays free for pipes."""
    sys.stderr.write(message + "\n")


@dataclass(frozen=True)
class Job:
    line: int  # 1-based line in the prompt file (0 for --prompt)
    prompt: str
    seed: int
    negative_prompt: str
    name: str


def read_jobs(path: Path, base_seed: int, negative_prompt: str) -> tuple[list[Job], list[str]]:
    """Jobs and problems (``"line N: ..."``) of a prompt file; raises if it holds no prompt lines at all."""
    if not path.is_file():
        raise EditKitError(f"Prompt file not found: '{path}'.")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    jobs, problems = [], []
    index = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.strip()
        if not text or (not jsonl and text.startswith("#")):
            continue
        k, index = index, index + 1
        if not jsonl:
            jobs.append(Job(number, text, base_seed + k, negative_prompt, f"{k:04d}"))
            continue
        try:
            entry = json.loads(text)
        except ValueError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg})")
            continue
        problem = _entry_problem(entry)
        if problem:
            problems.append(f"line {number}: {problem}")
            continue
        jobs.append(Job(number, entry["prompt"].strip(), int(entry.get("seed", base_seed + k)),
                        entry.get("negative_prompt", negative_prompt), str(entry.get("name", f"{k:04d}"))))
    if index == 0:
        raise EditKitError(f"The prompt file '{path}' holds no prompts (one per line, or one JSON object per line "
                           "in a .jsonl file).")
    return jobs, problems


def _entry_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return "expected a JSON object like {\"prompt\": \"...\"}"
    unknown = sorted(set(entry) - {"prompt", "seed", "negative_prompt", "name"})
    if unknown:
        return f"unknown key(s) {', '.join(unknown)} (allowed: prompt, seed, negative_prompt, name)"
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        return "no prompt (\"prompt\" must be a non-empty string)"
    seed = entry.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        return f"seed must be a whole number from 0 to 2^64-1 (got {seed!r})"
    if not isinstance(entry.get("negative_prompt", ""), str):
        return "negative_prompt must be a string"
    name = entry.get("name", "x")
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
        return f"name must be a plain file name without folders (got {name!r})"
    return None


def save_png(picture, path: Path) -> None:
    """Write the PNG under a temporary name and rename it, so no half-written picture is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        picture.save(partial, format="PNG")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class _Bar:
    """A tqdm bar over every transformer call of the batch (a plain counter line without tqdm)."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        self._count = 0
        self.total = total
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def step(self, *_args) -> None:
        self._count += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled and self._count % 10 == 0:
            _say(f"{self._count}/{self.total} steps")

    def note(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            _say(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines zimage", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; --out is then the picture's file name")
    source.add_argument("--prompts", type=Path, help="a text or .jsonl file of prompts; --out is then a folder")
    parser.add_argument("--out", type=Path, required=True, help="output .png (one prompt) or folder (batch)")
    parser.add_argument("--config", type=Path, help="stages YAML (default: the three-stage recipe in docs/zimage.md)")
    parser.add_argument("--models-dir", type=Path, default=os.environ.get("EDITKIT_MODELS_DIR"),
                        help="ComfyUI's models folder or one laid out like it (default: $EDITKIT_MODELS_DIR)")
    parser.add_argument("--seed", type=int, default=0, help="seed (a batch adds the line's index)")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (used by stages with CFG)")
    parser.add_argument("--lora", action="append", default=[], help="a Z-Image LoRA file (repeat to stack)")
    parser.add_argument("--lora-strength", action="append", type=float, default=[],
                        help="strength of each --lora, in order (default 1.0)")
    parser.add_argument("--upscale-method", default="nearest-exact",
                        choices=("nearest-exact", "bilinear", "area", "bicubic"))
    parser.add_argument("--on-bad-line", choices=("skip", "stop"), default="skip",
                        help="a bad line in --prompts: report it and go on (skip) or generate nothing (stop)")
    parser.add_argument("--diffusers-folder", help="name of the diffusers folder in <models>/diffusers")
    parser.add_argument("--transformer", help="transformer file in <models>/diffusion_models")
    parser.add_argument("--text-encoder", help="Qwen3-4B file in <models>/text_encoders")
    parser.add_argument("--vae", help="FLUX.1 VAE file in <models>/vae")
    parser.add_argument("--tokenizer-dir", type=Path, help="Qwen tokenizer files (default: the diffusers folder's, "
                                                            "or ComfyUI's bundled ones next to the models folder)")
    parser.add_argument("--device", help="cuda, cpu, mps (default: the best available)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="compute dtype (auto: bf16 on CUDA, "
                                                                         "else fp32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except EditKitError as exc:
        _say(f"error: {exc}")
        return 1


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..core.runtime import TorchRuntime
    from .api import ZImageProgressive, to_pil
    from .recipe import DEFAULT_STAGES_YAML, parse_recipe

    if args.models_dir is None:
        raise EditKitError("Give --models-dir (ComfyUI's models folder) or set EDITKIT_MODELS_DIR.")
    if args.config is not None and not args.config.is_file():
        raise EditKitError(f"Stages file not found: '{args.config}'.")
    recipe = parse_recipe(args.config.read_text(encoding="utf-8") if args.config else DEFAULT_STAGES_YAML)
    if len(args.lora_strength) not in (0, len(args.lora)):
        raise EditKitError("Give one --lora-strength per --lora (or none for 1.0 each).")
    strengths = args.lora_strength or [1.0] * len(args.lora)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise EditKitError("The prompt is empty. Describe the picture to generate.")
        jobs, problems = [Job(0, args.prompt, args.seed, args.negative_prompt, args.out.stem)], []
        target = {jobs[0].name: args.out if args.out.suffix else args.out.with_suffix(".png")}
    else:
        jobs, problems = read_jobs(args.prompts, args.seed, args.negative_prompt)
        target = {job.name: args.out / f"{job.name}.png" for job in jobs}
        if len(target) != len(jobs):
            raise EditKitError("Two lines of the prompt file share a 'name'; give every line its own name.")
    for problem in problems:
        _say(f"bad prompt {problem}")
    if problems and args.on_bad_line == "stop":
        _say(f"stopped: {len(problems)} bad line(s), nothing generated (use --on-bad-line skip to go on).")
        return 2
    if not jobs:
        raise EditKitError("No usable prompt in the file (every line was bad).")

    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    per_picture = sum(recipe.model_calls(s) for s in recipe.stages)
    bar = _Bar(per_picture * len(jobs), enabled=not args.quiet)
    runtime = TorchRuntime(args.device, on_progress=bar.step)
    pipe = ZImageProgressive.from_models_dir(
        args.models_dir, diffusers_folder=args.diffusers_folder, transformer=args.transformer,
        text_encoder=args.text_encoder, vae=args.vae, tokenizer_dir=args.tokenizer_dir, device=args.device,
        dtype=dtype, runtime=runtime,
    )
    written = 0
    try:
        for job in jobs:
            result = pipe.run(job.prompt, seed=job.seed, stages=recipe, negative_prompt=job.negative_prompt,
                              lora=args.lora, lora_strength=strengths, upscale_method=args.upscale_method)
            save_png(to_pil(result.image[0]), target[job.name])
            written += 1
            bar.note(f"wrote {target[job.name]}")
    finally:
        bar.close()
    skipped = f", skipped {len(problems)} bad line(s)" if problems else ""
    _say(f"done: {written} picture(s){skipped}.")
    return 0
