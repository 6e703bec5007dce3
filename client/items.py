"""What a batch is made of: items (a picture or a prompt line with its own settings) and their names.

Items come from folders of pictures (:func:`picture_items`) or a prompts file (:func:`prompt_items`).
Each has a ``key`` that identifies it across runs (the manifest's ``item``) and an output ``stem`` that
depends only on the item, so its pictures get the same names on every run: ``<subdir>/<stem>_<node>_<n>``
(see :mod:`client.outputs`). Two items that would share a stem in one folder (``a.png`` and ``a.jpg``,
or names that differ only in characters a file name cannot hold) get a short hash of their key added.
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WorkflowError
from .files import list_pictures, safe_stem
from .workflow import split_target

JSONL_FIELDS = {"id", "prompt", "set", "image"}


@dataclass
class Item:
    """One unit of work: a picture or a prompt line, with its own overrides."""

    key: str
    input: str
    picture: Path | None = None
    prompt_text: str | None = None
    sets: dict = field(default_factory=dict)
    subdir: Path = Path()
    stem: str = "item"
    attempts: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    not_before: float = 0.0


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def unique_stems(items: list[Item]) -> list[Item]:
    """Give items that would write the same names in one folder distinct stems (case-insensitively, as
    on macOS and Windows file systems); the others keep theirs."""
    groups: dict[tuple[str, str], list[Item]] = collections.defaultdict(list)
    for item in items:
        groups[(item.subdir.as_posix().casefold(), item.stem.casefold())].append(item)
    for group in groups.values():
        if len(group) > 1:
            for item in group:
                item.stem = f"{item.stem}-{_short_hash(item.key)}"
    return items


def picture_items(folders: list[Path]) -> list[Item]:
    """Every picture under the folders (recursively); keys and stems are stable across runs."""
    pairs = list_pictures(folders)
    several = len({str(Path(root).resolve()) for root, _ in pairs}) > 1
    items = []
    for root, path in pairs:
        rel = path.relative_to(root)
        key = f"{Path(root).resolve().as_posix()}::{rel.as_posix()}"
        subdir = rel.parent
        if several:
            subdir = Path(safe_stem(Path(root).resolve().name) or "input") / subdir
        items.append(Item(key=key, input=str(path), picture=path, subdir=subdir, stem=safe_stem(path.stem) or "picture"))
    return unique_stems(items)


def prompt_items(path: Path) -> list[Item]:
    """Items of a prompts file: text (one prompt a line, ``#`` comments) or JSONL objects with
    ``prompt``, ``set`` ({"NODE.INPUT": value}), ``image`` (path, relative to the file) and ``id``.

    The output stem is the ``id`` when given, else ``prompt-`` and a hash of the line, so inserting a
    line never renames (or overwrites) the outputs of the others.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"cannot read prompts file '{path}': {exc}") from exc
    items: list[Item] = []
    seen: collections.Counter = collections.Counter()
    jsonl = Path(path).suffix.lower() in (".jsonl", ".ndjson")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (not jsonl and line.lstrip().startswith("#")):
            continue
        given_id = None
        if jsonl:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkflowError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
            if not isinstance(entry, dict):
                raise WorkflowError(f"{path}:{number}: expected a JSON object, got {type(entry).__name__}")
            unknown = sorted(set(entry) - JSONL_FIELDS)
            if unknown:
                raise WorkflowError(f"{path}:{number}: unknown field '{unknown[0]}' (allowed: "
                                    f"{', '.join(sorted(JSONL_FIELDS))})")
            sets = entry.get("set") or {}
            if not isinstance(sets, dict):
                raise WorkflowError(f"{path}:{number}: 'set' must be an object of \"NODE.INPUT\": value")
            for target in sets:
                split_target(target)
            picture = None
            if entry.get("image"):
                picture = (Path(path).parent / str(entry["image"])).expanduser()
            prompt_text = entry.get("prompt")
            if prompt_text is not None and not isinstance(prompt_text, str):
                raise WorkflowError(f"{path}:{number}: 'prompt' must be text")
            given_id = str(entry["id"]) if "id" in entry else None
            identity = given_id if given_id is not None else json.dumps(entry, sort_keys=True, ensure_ascii=False)
        else:
            prompt_text, sets, picture, identity = line.strip(), {}, None, line.strip()
        digest = hashlib.sha1(identity.encode("utf-8")).hexdigest()[:16]
        seen[digest] += 1
        repeat = f"#{seen[digest]}" if seen[digest] > 1 else ""
        key = f"prompt:{digest}{repeat}"
        stem = (safe_stem(given_id) if given_id is not None else "") or f"prompt-{digest[:12]}"
        label = prompt_text if prompt_text is not None else (str(picture) if picture else identity)
        items.append(Item(key=key, input=label, picture=picture, prompt_text=prompt_text, sets=sets,
                          stem=stem + (f"-{seen[digest]}" if repeat else "")))
    if not items:
        raise WorkflowError(f"prompts file '{path}' holds no prompts")
    return unique_stems(items)
