"""Command line: ``python -m client run|batch|serve`` (from the repository root).

Exit status: 0 success, 1 a readable error (printed to stderr, or as a JSON line with ``--json``),
2 wrong usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from . import console
from .errors import ClientError
from .workflow import bundled_names


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", action="append", metavar="URL",
                        help="ComfyUI server (repeatable); default http://127.0.0.1:8188")
    parser.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                        help="override an input; NODE is an id or a title; VALUE is JSON when it parses")
    parser.add_argument("--json", action="store_true", help="JSON event lines on stdout instead of a progress bar")
    parser.add_argument("--stall-timeout", type=float, default=600.0, metavar="S",
                        help="a prompt with no message from its server for S seconds counts as hung (default 600)")
    parser.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                        help="limit for one HTTP call to ComfyUI (default 30)")


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(bundled_names()) or "(none)"
    parser = argparse.ArgumentParser(prog="python -m client", description="EditKit's ComfyUI client.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one workflow once",
                              description=f"Run a workflow once. Bundled workflows: {names}.")
    run.add_argument("workflow", help="bundled workflow name or path to an API-format .json")
    run.add_argument("--image", action="append", metavar="NODE=PATH", help="upload PATH and wire it into NODE's image")
    run.add_argument("--out", default="outputs", help="folder for the outputs (default ./outputs)")
    run.add_argument("--no-validate", action="store_true", help="skip the /object_info check before queueing")
    _common(run)

    batch = commands.add_parser("batch", help="run a workflow over folders of pictures or a prompts file",
                                description=f"Batch a workflow over many servers. Bundled workflows: {names}.")
    batch.add_argument("workflow", help="bundled workflow name or path to an API-format .json")
    batch.add_argument("--input", action="append", metavar="FOLDER", help="folder of pictures (recursive; repeatable)")
    batch.add_argument("--prompts", metavar="FILE", help="text file (a prompt a line) or JSONL (prompt, set, image, id)")
    batch.add_argument("--out", required=True, help="output folder (the manifest goes there too)")
    batch.add_argument("--manifest", help="manifest path (default OUT/manifest.jsonl)")
    batch.add_argument("--image-node", help="node that receives each picture (default: the only LoadImage)")
    batch.add_argument("--prompt-target", metavar="NODE.INPUT", help="where prompt lines go (default: the only prompt input)")
    batch.add_argument("--in-flight", type=int, default=2, help="prompts queued per server at once (default 2)")
    batch.add_argument("--max-failures", type=int, default=3, help="fail an item after N identical failures (default 3)")
    batch.add_argument("--retry-base", type=float, default=1.0, help="first retry delay in seconds, doubling (default 1)")
    batch.add_argument("--give-up-after", type=float, default=600.0,
                       help="stop when no server has answered for S seconds (default 600)")
    batch.add_argument("--probe-interval", type=float, default=2.0, help="seconds between probes of a down server")
    batch.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="run on a Ray cluster, one ComfyUI server per actor (docs/scale-out.md): no ADDRESS starts "
                            "a local cluster, 'auto' joins the one `ray start` made, or give HOST:PORT / ray://HOST:PORT")
    batch.add_argument("--ray-config", metavar="FILE",
                       help="YAML with a 'ray:' section (address, runtime_env, pools.batch: actors, num_gpus, "
                            "comfyui_root, ...); with --ray and only --server, one actor attaches to each URL")
    _common(batch)

    serve = commands.add_parser("serve", help="serve the apps' HTTP API in front of ComfyUI")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --token)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", default=os.environ.get("EDITKIT_SERVE_TOKEN"),
                       help="access token clients must send (default $EDITKIT_SERVE_TOKEN)")
    serve.add_argument("--experiments", default=None, help="experiments file (default client/experiments.yaml)")
    serve.add_argument("--server", action="append", metavar="URL", help="ComfyUI server (repeatable)")
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32 MB)")
    serve.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest picture in pixels (default 4096²)")
    serve.add_argument("--stall-timeout", type=float, default=600.0, metavar="S")
    serve.add_argument("--keep-files", action="store_true",
                       help="run workflows as written: uploaded and saved pictures stay in ComfyUI's input/ and output/ "
                            "(default: pictures travel in the prompt and over the WebSocket, nothing is left there)")
    serve.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                       help="let browser pages from ORIGIN (e.g. http://localhost:3000; '*' for any) call the API "
                            "(repeatable)")

    from .dataset.cli import add_parser as add_dataset_parser

    add_dataset_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dataset":  # synchronous; runs its own event loops for the server stages
        from .dataset.cli import dataset_command

        return dataset_command(args)
    if args.command == "run":
        from .run import run_command as command
    elif args.command == "batch":
        from .batch import batch_command as command
    else:
        from .experiments import DEFAULT_FILE
        from .serve import serve_command as command

        args.experiments = args.experiments or str(DEFAULT_FILE)
    try:
        return asyncio.run(command(args))
    except ClientError as exc:
        if getattr(args, "json", False):
            console.event({"event": "error", "error": str(exc)})
        console.err(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        console.err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
