"""Stage 1, ingest: find the samples in the read-only source folders and record what they are.

Each root holds category folders; a sample is a picture whose path relative to the root matches
``inputs.pattern`` (default ``{category}/{id}/{id}.{ext}``: the id repeated as folder and file name,
as in ``人物物体一致性/0004_image_129/0004_image_129.png``). A picture that breaks the convention, a
file Pillow cannot read, a second sample with an id already seen, a category folder without any
sample and an empty or malformed instruction file (not UTF-8, not valid JSON, not a list of strings)
are recorded as QA issues, never a crash; a root that does not
exist or holds no picture at all stops the run with a clear message. Sources are opened read-only;
nothing is written next to them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import ClientError


@dataclass
class Sample:
    id: str
    category: str
    path: str  # absolute path of the source picture
    rel: str  # path relative to its root, POSIX
    width: int
    height: int
    sha256: str
    instructions: list[str] = field(default_factory=list)
    instruction_source: str = ""

    def record(self) -> dict:
        return {"item": self.id, "status": "done", **asdict(self)}


@dataclass
class Issue:
    check: str  # naming | unreadable | duplicate_id | empty_category | empty_instructions | no_instructions
    #             | bad_instructions
    path: str
    message: str
    category: str = ""
    id: str = ""


def pattern_regex(pattern: str, extensions: list[str]) -> re.Pattern:
    """``{category}/{id}/{id}.{ext}`` → a regex; a placeholder used twice must match the same text."""
    seen: set[str] = set()
    out = ""
    for piece in re.split(r"(\{\w+\})", pattern):
        name = piece[1:-1] if piece.startswith("{") and piece.endswith("}") else None
        if name is None:
            out += re.escape(piece)
        elif name in seen:
            out += f"(?P={name})"
        elif name == "ext":
            seen.add(name)
            out += "(?P<ext>" + "|".join(re.escape(e) for e in extensions) + ")"
        else:
            seen.add(name)
            out += f"(?P<{name}>[^/]+)"
    if not {"id", "category"} <= seen:
        raise ClientError(f"inputs.pattern '{pattern}' must contain {{category}} and {{id}}")
    return re.compile(out + r"\Z", re.IGNORECASE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _picture_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as picture:
        picture.verify()
    with Image.open(path) as picture:
        picture.load()
        return picture.size


class BadInstructions(ValueError):
    """An instruction file that cannot be read as documented; the message says what is wrong and the fix."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path


def read_instructions(sample_dir: Path, sample_id: str, config: dict) -> tuple[list[str] | None, str]:
    """Instructions from a per-sample file (``.txt``: one a line; ``.json``: a list or
    ``{"instructions": [...]}``), else ``None``. Empty files give an empty list; a file that is not
    UTF-8, not valid JSON or not of that shape raises :class:`BadInstructions` (ingest turns it into a
    QA issue, the sample gets no pairs)."""
    for template in config["instructions"]["files"]:
        path = sample_dir / template.format(id=sample_id)
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise BadInstructions(path, f"not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                                  "save the file as UTF-8") from exc
        except OSError as exc:
            raise BadInstructions(path, f"cannot be read ({exc.strerror or exc})") from exc
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text) if text.strip() else []
            except json.JSONDecodeError as exc:
                raise BadInstructions(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); write a "
                                      'list of strings, e.g. ["make it rain"]') from exc
            items = data.get("instructions", []) if isinstance(data, dict) else data
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise BadInstructions(path, 'expected a list of strings or {"instructions": [...]}, got '
                                      f"{type(items).__name__ if not isinstance(items, list) else 'a list with non-text'}")
            lines = [x.strip() for x in items if x.strip()]
        else:
            lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return lines, str(path)
    return None, ""


def ingest(config: dict) -> tuple[list[Sample], list[Issue]]:
    roots = [Path(r) for r in config["inputs"]["roots"]]
    if not roots:
        raise ClientError("no input folders: set inputs.roots in the config (e.g. [data])")
    extensions = [e.lower().lstrip(".") for e in config["inputs"]["extensions"]]
    regex = pattern_regex(config["inputs"]["pattern"], extensions)
    wanted = set(config["inputs"]["categories"])
    samples: list[Sample] = []
    issues: list[Issue] = []
    by_id: dict[str, Sample] = {}
    for root in roots:
        if not root.is_dir():
            raise ClientError(f"input folder '{root}' does not exist: fix inputs.roots")
        pictures = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in extensions)
        if not pictures:
            raise ClientError(f"input folder '{root}' holds no pictures ({', '.join(extensions)}): "
                              "check inputs.roots and inputs.extensions")
        per_category: dict[str, int] = {p.name: 0 for p in root.iterdir() if p.is_dir()}
        for path in pictures:
            rel = path.relative_to(root).as_posix()
            match = regex.match(rel)
            if match is None:
                issues.append(Issue("naming", str(path), f"'{rel}' does not follow the naming convention "
                                    f"'{config['inputs']['pattern']}'", category=rel.split("/")[0]))
                continue
            category, sample_id = match["category"], match["id"]
            if wanted and category not in wanted:
                continue
            try:
                width, height = _picture_size(path)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                issues.append(Issue("unreadable", str(path), f"cannot read the picture ({type(exc).__name__}: "
                                    f"{exc})", category, sample_id))
                continue
            if sample_id in by_id:
                issues.append(Issue("duplicate_id", str(path), f"id '{sample_id}' already used by "
                                    f"'{by_id[sample_id].path}'; this one is skipped", category, sample_id))
                continue
            sample = Sample(sample_id, category, str(path.resolve()), rel, width, height, _sha256(path))
            try:
                found, source = read_instructions(path.parent, sample_id, config)
            except BadInstructions as exc:
                issues.append(Issue("bad_instructions", str(exc.path), f"the instruction file is {exc}; the sample "
                                    "gets no pairs until it is fixed", category, sample_id))
                found, source = [], str(exc.path)
            if found is None:
                found = list(config["instructions"]["templates"].get(category, config["instructions"]["default"]))
                source = "template" if category in config["instructions"]["templates"] else "default"
                if not found:
                    issues.append(Issue("no_instructions", str(path), "no instruction file and no template for "
                                        f"category '{category}'", category, sample_id))
            elif not found and not any(i.check == "bad_instructions" and i.id == sample_id for i in issues):
                issues.append(Issue("empty_instructions", source, "the instruction file is empty", category,
                                    sample_id))
            sample.instructions, sample.instruction_source = found, source
            by_id[sample_id] = sample
            samples.append(sample)
            per_category[category] = per_category.get(category, 0) + 1
        for category, count in sorted(per_category.items()):
            if count == 0 and (not wanted or category in wanted):
                issues.append(Issue("empty_category", str(root / category), f"category folder '{category}' has no "
                                    "sample that follows the naming convention", category))
    return samples, issues
