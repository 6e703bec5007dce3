"""Exactly-once outputs for ``batch``: every picture in the output tree is listed by the manifest, once.

An item's pictures are written in three steps, each safe to interrupt:

1. **stage**: every picture is written (fsynced) under ``OUT/.editkit-partial/<token>/<its final path>``,
   where ``token`` is the prompt id of the attempt (unique per attempt);
2. **record**: the item's manifest line is appended; it lists the final paths and carries the token;
3. **commit**: each staged picture is moved into place with ``os.replace``.

A kill before step 2 leaves only staged files, which :meth:`OutputStore.recover` removes at the next start
(the item is redone). A kill between 2 and 3 leaves a record whose pictures are still staged under its
token: ``recover`` adopts them (moves them into place). So a picture appears in the output tree only
when a manifest line lists it, and the names are fixed per item (see :func:`output_name`), so a redone
item overwrites its own files instead of adding a second set. When an item is redone (other settings),
the files its earlier record listed and its new one does not are removed once the new record is in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .files import partial_dir, remove_if_empty, safe_stem, write_file_synced


def output_name(stem: str, node_id: str, index: int, suffix: str) -> str:
    """``<stem>_<node>_<n><ext>``: the same for an item on every run (n counts a node's pictures from 1)."""
    return f"{stem}_{safe_stem(str(node_id)) or 'node'}_{index}{suffix or '.png'}"


class OutputStore:
    """The output tree of one batch (``out_dir``) and the three steps above."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.partial = partial_dir(self.out_dir)

    def recover(self, records: list[dict]) -> None:
        """Finish what a killed run left: adopt staged pictures of recorded attempts, drop the rest, and
        remove files of done records that a later done record of the same item replaced."""
        last: dict[str, dict] = {}
        for record in records:
            last[str(record["item"])] = record
        staged_tokens = {p.name for p in self.partial.iterdir()} if self.partial.is_dir() else set()
        for record in last.values():
            token = record.get("prompt_id")
            if record.get("status") != "done" or str(token) not in staged_tokens:
                continue
            for rel in record.get("outputs") or []:
                staged = self.partial / str(token) / rel
                if staged.is_file():
                    target = self.out_dir / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, target)
        current = {rel for r in last.values() if r.get("status") == "done" for rel in r.get("outputs") or []}
        for record in records:
            if record is last[str(record["item"])] or record.get("status") != "done":
                continue
            for rel in record.get("outputs") or []:
                if rel not in current:
                    self._remove(rel)
        shutil.rmtree(self.partial, ignore_errors=True)

    def stage(self, token: str, files: list[tuple[str, bytes]]) -> None:
        for rel, data in files:
            path = self.partial / token / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file_synced(path, data)

    def commit(self, token: str, rels: list[str], replaced: list[str] = ()) -> list[Path]:
        """Move the staged pictures into place; remove ``replaced`` files no longer listed."""
        placed = []
        for rel in rels:
            target = self.out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.partial / token / rel, target)
            placed.append(target)
        for rel in set(replaced) - set(rels):
            self._remove(rel)
        self.discard(token)
        return placed

    def discard(self, token: str) -> None:
        """Drop an attempt's staged pictures (never recorded) and the hidden folder when it is empty."""
        shutil.rmtree(self.partial / token, ignore_errors=True)
        remove_if_empty(self.partial)

    def close(self) -> None:
        """At the end of a run: remove the hidden folder when nothing is left staged in it."""
        remove_if_empty(self.partial)

    def _remove(self, rel: str) -> None:
        try:
            (self.out_dir / rel).unlink()
        except FileNotFoundError:
            pass
