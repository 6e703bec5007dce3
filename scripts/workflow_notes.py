"""The "model files" Note of each UI workflow, written from ``workflows/notes/models.json``.

A template that names ``flux1-fill-dev-Q8_0.gguf`` in a loader is useless to someone who does not know where that
file comes from or which ``models/`` folder it belongs in. ``workflows/notes/models.json`` holds one entry per model
file or folder a bundled workflow names (key: the exact widget value), with its ComfyUI folder, where to get it and
one line about it. :func:`note_text` finds every entry a workflow's API file uses and writes the Note's text;
``scripts/export_ui_workflows.py`` puts it into the UI workflow as a Note node, and
``tests/test_workflow_formats.py`` fails when a workflow names a model file without an entry or a Note is stale.

The same entries give each loader node its ``properties.models`` (:func:`node_models`): ``name``, ``url`` and
``directory`` of every single file it names that has a public download URL, the way ComfyUI's own templates
list theirs. Frontend 1.27.10 reads that list when a template is opened and shows its "missing models" dialog,
with download buttons, for the files the server's model folders lack. A whole diffusers folder cannot be
listed that way (the dialog knows single files only), so the Note names its repository. GGUF files are left
out of the list: ComfyUI's model listing (``/experiment/models/<folder>``) shows only its own weight suffixes,
so the dialog would call a ``.gguf`` missing even when it is there; the Note and the loader's queue-time
message give its URL instead.

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
# Files the frontend's model listing cannot see (not among ComfyUI's supported_pt_extensions), so never in
# properties.models (see the module docstring).
UNLISTED_EXTENSIONS = (".gguf",)
# Widget values that name a model file end with one of these; diffusers folders are named by inputs ending in
# "_folder". Values in parentheses ("(from folder)", "(none)") select nothing.
MODEL_EXTENSIONS = (".safetensors", ".sft", ".gguf", ".pth", ".pt", ".ckpt", ".bin")


class NoteError(ValueError):
    """A workflow names a model file that ``workflows/notes/models.json`` does not describe."""


def load_models(path: Path = MODELS_FILE) -> dict[str, dict]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["models"]


def _id_order(node_id) -> tuple:
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def node_references(node: dict) -> list[str]:
    """Model files and folders one API node names, in input order."""
    found: list[str] = []
    for name, value in node.get("inputs", {}).items():
        if not isinstance(value, str) or value.startswith("("):
            continue
        if (value.lower().endswith(MODEL_EXTENSIONS) or name.endswith("_folder")) and value not in found:
            found.append(value)
    return found


def model_references(api: dict) -> list[str]:
    """Model files and folders an API workflow names, in node-id order, each once."""
    found: list[str] = []
    for node_id in sorted(api, key=_id_order):
        found += [ref for ref in node_references(api[node_id]) if ref not in found]
    return found


def node_models(api: dict, models: dict[str, dict] | None = None) -> dict[str, list[dict]]:
    """``properties.models`` of each node that names downloadable single files: ``{node id: [{name, url,
    directory}, ...]}`` (see the module docstring for what is left out and why)."""
    models = load_models() if models is None else models
    out: dict[str, list[dict]] = {}
    for node_id in sorted(api, key=_id_order):
        entries = [{"name": ref, "url": models[ref]["url"], "directory": models[ref]["folder"]}
                   for ref in node_references(api[node_id])
                   if ref in models and models[ref].get("url") and models[ref].get("kind") != "folder"
                   and not ref.lower().endswith(UNLISTED_EXTENSIONS)]
        if entries:
            out[str(node_id)] = entries
    return out


def note_text(api: dict, models: dict[str, dict] | None = None) -> str:
    """The Note for one workflow: each model file, the folder it goes in and where to get it."""
    models = load_models() if models is None else models
    references = model_references(api)
    unknown = [ref for ref in references if ref not in models]
    if unknown:
        raise NoteError(f"no entry in {MODELS_FILE.relative_to(ROOT)} for {', '.join(unknown)}: add one (folder, "
                        "source, what) so the template's Note can say where the file goes and where to get it")
    lines = ["Model files this workflow needs (paths under ComfyUI/models/). Nothing is downloaded for you: "
             "missing single files are listed with download buttons when the template opens.", ""]
    for ref in references:
        entry = models[ref]
        suffix = "/" if entry.get("kind") == "folder" else ""
        lines.append(f"* {ref}{suffix}  ->  models/{entry['folder']}/{ref}{suffix}")
        lines.append(f"  {entry['what']}.")
        lines.append(f"  Get it: {entry['source']}.")
        if entry.get("url"):
            lines.append(f"  Download: {entry['url']}")
        elif entry.get("repo"):
            lines.append(f"  Download: https://huggingface.co/{entry['repo']} (every file, e.g. "
                         f"hf download {entry['repo']} --local-dir models/{entry['folder']}/{ref})")
    if not references:
        lines.append("* none")
    lines += ["", "Other files or names: pick them in the loader node. The example pictures are copied into "
              "ComfyUI/input/ when EditKit loads (your own files of the same name are kept)."]
    return "\n".join(lines)
