"""Run EditKit's benchmarks: ``python -m scripts.bench [options] FAMILY[:PART,PART] ... | all``.

Families: fill, flux_sampler, qwen_image, zimage, flux2, gguf, lora, redux, kontext, ben2 (each file's docstring
says what it measures). ``all`` runs every family and part: the figures README "Benchmarks" quotes.
``--quick`` is a smoke run (1-block models, 128², 2 rounds) to check the harness, not for figures.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from .harness import add_arguments, settings_from

FAMILIES = ("fill", "flux_sampler", "qwen_image", "zimage", "flux2", "gguf", "lora", "redux", "kontext", "ben2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="+", help="FAMILY, FAMILY:PART[,PART] or all")
    add_arguments(parser)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile=on cases")
    parser.add_argument("--quants", default="Q8_0,Q5_1,Q4_0,Q4_K", help="gguf: GGUF types")
    parser.add_argument("--caches", default="full,10%,off", help="gguf: cache settings")
    parser.add_argument("--file-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="fill:comfyui: the transformer file's dtype (fp32: both sides store and compute fp32; "
                             "bf16: native widens it to fp32, EditKit's auto keeps bf16 and casts per layer)")
    parser.add_argument("--decode-ab", action="store_true",
                        help="gguf:calls: also decode on every thread (the setting before DECODE_THREADS = 1)")
    args = parser.parse_args(argv)
    settings = settings_from(args)
    settings.extra.update(compile=not args.no_compile, quants=tuple(args.quants.split(",")),
                          caches=tuple(args.caches.split(",")), decode_ab=args.decode_ab,
                          file_dtype=args.file_dtype)
    targets = list(FAMILIES) if args.targets == ["all"] else args.targets
    print(f"torch {torch.__version__}, {settings.describe()}, Flux {settings.flux_depth}, Qwen {settings.qwen_depth}, "
          f"Z-Image {settings.zimage_depth} blocks")
    for target in targets:
        family, _, parts = target.partition(":")
        if family not in FAMILIES:
            parser.error(f"unknown family {family!r}; choose from {', '.join(FAMILIES)} or all")
        module = importlib.import_module(f"scripts.bench.{family}")
        chosen = tuple(parts.split(",")) if parts else module.PARTS
        unknown = set(chosen) - set(module.PARTS)
        if unknown:
            parser.error(f"{family} has no part {', '.join(sorted(unknown))}; it has {', '.join(module.PARTS)}")
        started = time.perf_counter()
        module.run(settings, chosen)
        print(f"\n({family}: {time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
