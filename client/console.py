"""Writing to the terminal: results on stdout, notices and errors on stderr, JSON lines for scripts.

One place for it so the rest of the package never calls ``print`` (the repository's lint bans it in
library code) and every line is flushed at once, which matters when a script reads ``--json`` events
as they happen.
"""

from __future__ import annotations

import json
import sys


def out(text: str) -> None:
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def err(text: str) -> None:
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def event(data: dict) -> None:
    out(json.dumps(data, ensure_ascii=False))
