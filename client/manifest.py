"""The batch manifest: one JSON line per finished item, appended as items finish.

Appending is the only write, one ``os.write`` of a whole line on an ``O_APPEND`` descriptor followed
by ``fsync``, so a ``kill -9`` leaves at worst one torn last line; readers skip a line that does not
parse and the next append starts on a fresh line. Reading keeps the last record per item key, so a
redone item's new record wins. 10,000 lines load in a few tens of milliseconds (one ``json.loads``
per line, nothing else).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class Manifest:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.torn_lines = 0

    def records(self) -> list[dict]:
        """Every record in file order (empty when the file does not exist yet)."""
        records: list[dict] = []
        self.torn_lines = 0
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return records
        with handle:
            for raw in handle:
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self.torn_lines += 1
                    continue
                if isinstance(record, dict) and "item" in record:
                    records.append(record)
        return records

    def load(self) -> dict[str, dict]:
        """Last record per item key (empty when the file does not exist yet)."""
        return {str(record["item"]): record for record in self.records()}

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as reader:
                    reader.seek(size - 1)
                    if reader.read(1) != b"\n":
                        line = b"\n" + line  # a torn line from a killed run: start fresh
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
