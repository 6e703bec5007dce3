"""Two-stage Kontext-inpaint fine-tune from the command line.

    python scripts/train_kontext_inpaint.py --config cfg.yaml --data DATASET --output RUN
    accelerate launch scripts/train_kontext_inpaint.py --config cfg.yaml --data DATASET --output RUN
    python scripts/train_kontext_inpaint.py ... --resume latest          # continue the run in RUN
    python scripts/train_kontext_inpaint.py ... --set train.batch_size=2 --set model.model_kwargs.stage1_steps=500

DATASET holds source_images/, target_images/ (same file stems), optional masks/ and one
instruction per pair (<stem>.txt or instructions.jsonl). RUN receives the latent cache,
train_log.jsonl and checkpoint-<step>/ folders (diffusers transformer/, a BFL-layout
.safetensors for ComfyUI's models/diffusion_models, and the training state). See the README.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from packload import load_pack, offline, pack_module  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", type=Path, help="YAML config (model:, train:, data:); defaults apply to "
                                                    "every key it leaves out")
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (source_images/, target_images/, ...)")
    parser.add_argument("--output", type=Path, required=True, help="run folder for the cache, log and checkpoints")
    parser.add_argument("--resume", help="a checkpoint-<step> folder, or 'latest' for the newest one in --output")
    parser.add_argument("--stop-at-step", type=int, help="stop (with a checkpoint) after this global step, e.g. to "
                                                         "split a run into jobs; continue later with --resume latest")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.optimizer=adafactor (repeatable)")
    return parser


def _show_progress() -> None:
    """Send the trainer's progress lines (loss, s/step, checkpoints) to stdout, and nothing else."""
    logger = logging.getLogger("EditKit")
    if any(getattr(h, "editkit_cli", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.editkit_cli = True
    handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    offline()
    load_pack()
    errors = pack_module("pipelines.core.errors")
    train = pack_module("pipelines.flux.kontext_inpaint.train")
    train_config = pack_module("pipelines.flux.kontext_inpaint.config")
    _show_progress()
    try:
        config = train_config.load_config(args.config, args.overrides)
        result = train.train(config, args.data, args.output, resume=args.resume, stop_at_step=args.stop_at_step)
    except errors.EditKitError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    from accelerate import PartialState

    if result.checkpoints and PartialState().is_main_process:
        print(f"done at step {result.global_step}; last checkpoint: {result.checkpoints[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
