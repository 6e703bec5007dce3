"""The "model files" Note of each UI workflow, written from ``workflows/notes/models.json``.

A template that names ``flux1-fill-dev-Q8_0.gguf`` in a loader is useless to someone who does not know where that
file comes from or which ``models/`` folder it belongs in. ``workflows/notes/models.json`` holds one entry per model
file or folder a bundled workflow names (key: the exact widget value), with its ComfyUI folder, where to get it and
one line about it. :func:`note_text` finds every entry a workflow's API file uses and writes the Note's text;
``scripts/export_ui_workflows.py`` puts it into the UI workflow as a Note node, and
``tests/test_workflow_formats.py`` fails when a workflow names a model file without an entry or a Note is stale.

Standard library only, like the export script.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS_FILE = ROOT / "workflows" / "notes" / "models.json"
NOTE_TYPE = "Note"  # the frontend's plain-text note (a virtual node: never part of the queued prompt)
NOTE_TITLE = "Model files (read me)"
NOTE_TYPES = ("Note", "MarkdownNote")
# Widget values that name a model file end with one of these; diffusers folders are named by inputs ending in
# "_folder". Values in parentheses ("(from folder)", "(none)") select nothing.
MODEL_EXTENSIONS = (".safetensors", ".sft", ".gguf", ".pth", ".pt", ".ckpt", ".bin")


class NoteError(ValueError):
    """A workflow names a model file that ``workflows/notes/models.json`` does not describe."""


def load_models(path: Path = MODELS_FILE) -> dict[str, dict]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["models"]


def model_references(api: dict) -> list[str]:
    """Model files and folders an API workflow names, in node-id order, each once."""
    found: list[str] = []
    for node_id in sorted(api, key=lambda i: (0, int(i), "") if str(i).isdigit() else (1, 0, str(i))):
        for name, value in api[node_id].get("inputs", {}).items():
            if not isinstance(value, str) or value.startswith("("):
                continue
            if (value.lower().endswith(MODEL_EXTENSIONS) or name.endswith("_folder")) and value not in found:
                found.append(value)
    return found


def note_text(api: dict, models: dict[str, dict] | None = None) -> str:
    """The Note for one workflow: each model file, the folder it goes in and where to get it."""
    models = load_models() if models is None else models
    references = model_references(api)
    unknown = [ref for ref in references if ref not in models]
    if unknown:
        raise NoteError(f"no entry in {MODELS_FILE.relative_to(ROOT)} for {', '.join(unknown)}: add one (folder, "
                        "source, what) so the template's Note can say where the file goes and where to get it")
    lines = ["Model files this workflow needs (paths under ComfyUI/models/). Nothing is downloaded for you.", ""]
    for ref in references:
        entry = models[ref]
        suffix = "/" if entry.get("kind") == "folder" else ""
        lines.append(f"* {ref}{suffix}  ->  models/{entry['folder']}/{ref}{suffix}")
        lines.append(f"  {entry['what']}.")
        lines.append(f"  Get it: {entry['source']}.")
    if not references:
        lines.append("* none")
    lines += ["", "Other files or names: pick them in the loader node. The example pictures are copied into "
              "ComfyUI/input/ when EditKit loads (your own files of the same name are kept)."]
    return "\n".join(lines)
