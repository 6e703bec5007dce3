"""``python -m pipelines <command> ...`` (from the repository root): EditKit's pipelines without ComfyUI.

Commands:

* ``zimage``: Z-Image-Turbo progressive generation for one prompt or a batch file (``--help`` for details).

Nothing here imports ComfyUI; models are read from a ComfyUI-style ``models`` folder.
"""

from __future__ import annotations

import os
import sys

COMMANDS = {"zimage": "Z-Image-Turbo progressive generation (one prompt, or a text/JSONL batch)."}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {about}" for name, about in COMMANDS.items()]
        sys.stderr.write("usage: python -m pipelines <command> [options]\n\ncommands:\n" + "\n".join(lines) + "\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # No hub look-ups, ever: every config ships with the pack and models come from local files.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .zimage import cli

    return cli.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
