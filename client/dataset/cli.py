"""``python -m client dataset --config FILE [--set key=value ...] [--mock] [--stage ...]``.

Only the parser is imported when ``python -m client`` starts; the factory (numpy and the image code) is
imported when the ``dataset`` command runs, so ``--help`` and the other commands never pay for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import console
from ..errors import ClientError

STAGES = ("ingest", "decompose", "generate", "export", "qa")


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "dataset", help="build an edit dataset: ingest → decompose → generate → export → qa",
        description="Run the edit-dataset factory (client/dataset/example.yaml documents every key). Each stage "
                    "is resumable: run the same command again after a failure or a kill.")
    parser.add_argument("--config", type=Path, help="YAML config (see client/dataset/example.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set qa.min_psnr_outside_mask=28 (repeatable)")
    parser.add_argument("--mock", action="store_true",
                        help="no servers: deterministic stand-ins for decomposition and edits (for tests and dry runs)")
    parser.add_argument("--stage", action="append", choices=STAGES,
                        help="run only these stages (repeatable; default all; ingest always runs)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run decompose and edit on a Ray cluster (the config's ray: section; no ADDRESS starts "
                             "a local one, 'auto' joins `ray start`'s; see docs/scale-out.md)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def dataset_command(args) -> int:
    from .config import load_config
    from .stages import Factory

    try:
        config = load_config(args.config, args.set)
        if args.ray is not None and (args.ray != "local" or not config["ray"]["address"]):
            config["ray"]["address"] = args.ray
        stages = args.stage or list(STAGES)

        def progress(stage, done, total):
            if not args.json and (done == total or done % 50 == 0):
                console.err(f"{stage}: {done}/{total}")

        result = Factory(config, args.mock, progress).run(stages)
    except ClientError as exc:
        console.err(f"error: {exc}")
        return 1
    if args.json:
        console.event(result)
    else:
        summary = result.get("qa") or {}
        for key, value in summary.items():
            console.out(f"{key}: {value}")
        if "export" in result:
            counts = result["export"]
            console.out(f"exported pairs: train {counts['train']}, validation {counts['validation']}")
        console.out(f"outputs: {config['outputs']}")
    return 0
