"""API-format workflows: finding them, addressing their nodes, and changing their inputs.

A workflow here is ComfyUI's API format (what ``POST /prompt`` takes): ``{node_id: {"class_type",
"inputs", "_meta": {"title"}}}``. Nodes are addressed the way people see them: by id or by the title
shown in the web UI, so ``--set "Repaint the background.steps=2"`` and ``--set 6.steps=2`` are the
same. The web UI's own save format (``{"nodes": [...], "links": [...]}``) is refused with a message
saying how to export the API format, since converting it needs the node definitions of the server
the file was made on (widget order, converted widgets) and a wrong guess would run a different graph.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .errors import WorkflowError, node_label

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR = REPO_ROOT / "workflows" / "api"


def bundled_names(folder: Path = BUNDLED_DIR) -> list[str]:
    """Names of the bundled API-format workflows (``workflows/api/<name>.json``)."""
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def resolve_workflow_path(name_or_path: str, folder: Path = BUNDLED_DIR) -> Path:
    """A bundled name or a path to a JSON file; an unknown name lists the bundled ones."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix.lower() == ".json" or candidate.exists() or "/" in name_or_path:
        if not candidate.is_file():
            raise WorkflowError(f"workflow file '{name_or_path}' does not exist")
        return candidate
    bundled = folder / f"{name_or_path}.json"
    if bundled.is_file():
        return bundled
    names = ", ".join(bundled_names(folder)) or "(none found in workflows/api)"
    raise WorkflowError(f"no bundled workflow named '{name_or_path}'. Bundled workflows: {names}. "
                        "Or pass the path of an API-format .json file.")


def load_workflow(name_or_path: str, folder: Path = BUNDLED_DIR) -> dict:
    """Read and check an API-format workflow; returns a fresh dict the caller may change."""
    path = resolve_workflow_path(name_or_path, folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkflowError(f"cannot read workflow '{path}': {exc}") from exc
    return check_api_format(data, str(path))


def check_api_format(data: Any, source: str) -> dict:
    """Refuse UI-format files and anything that is not ``{id: {class_type, inputs}}``."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise WorkflowError(
            f"'{source}' is a UI-format workflow (the web UI's Save), not the API format the client posts. "
            "Open it in ComfyUI and use Workflow → Export (API) (enable the dev mode options in the settings "
            "if the menu lacks it), then pass the exported file.")
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data:
        data = data["prompt"]  # a saved POST /prompt body
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"'{source}' is not an API-format workflow: expected a JSON object of nodes")
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(f"'{source}': node {node_id} has no class_type; is this an API-format workflow?")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"'{source}': node {node_id} has inputs that are not an object")
        node.setdefault("inputs", {})
    return {str(k): v for k, v in data.items()}


def title_of(prompt: dict, node_id: str) -> str:
    return str((prompt[node_id].get("_meta") or {}).get("title") or "")


def is_link(value: Any) -> bool:
    """ComfyUI treats every 2-item list ``[node_id, output_index]`` as a link."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], (str, int))


def describe_nodes(prompt: dict) -> str:
    return "; ".join(f"{i} '{title_of(prompt, i)}' ({n['class_type']})" for i, n in prompt.items())


def find_node(prompt: dict, ref: str) -> str:
    """A node id from an id or a title (exact first, then case-insensitive); ambiguity is an error."""
    ref = str(ref).strip()
    if ref in prompt:
        return ref
    for fold in (False, True):
        matches = [i for i in prompt if (title_of(prompt, i).casefold() == ref.casefold() if fold
                                         else title_of(prompt, i) == ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise WorkflowError(f"the title '{ref}' is shared by nodes {', '.join(matches)}; use the node id")
    raise WorkflowError(f"the workflow has no node with id or title '{ref}'. Nodes: {describe_nodes(prompt)}")


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, lists, quoted strings), otherwise the raw text."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def parse_assignment(expr: str) -> tuple[str, str, Any]:
    """``NODE.INPUT=VALUE`` → (node ref, input, value). NODE may itself contain dots (titles)."""
    target, sep, raw = expr.partition("=")
    if not sep:
        raise WorkflowError(f"--set '{expr}': expected NODE.INPUT=VALUE (e.g. 6.steps=2 or \"Fill inpaint.seed=7\")")
    node_ref, dot, input_name = target.rpartition(".")
    if not dot or not node_ref.strip() or not input_name.strip():
        raise WorkflowError(f"--set '{expr}': the left side must be NODE.INPUT (node id or title, a dot, input name)")
    return node_ref.strip(), input_name.strip(), parse_value(raw)


def split_target(target: str) -> tuple[str, str]:
    """``NODE.INPUT`` → (node ref, input); used for parameter maps and prompt targets."""
    node_ref, dot, input_name = str(target).rpartition(".")
    if not dot or not node_ref or not input_name:
        raise WorkflowError(f"'{target}' is not NODE.INPUT (a node id or title, a dot, an input name)")
    return node_ref, input_name


def resolve_target(prompt: dict, target: str, object_info: dict | None = None) -> list[tuple[str, str]]:
    """(node id, input) pairs a ``NODE.INPUT`` target names; ``*.INPUT`` means every node with that
    input as a constant (e.g. ``*.seed`` for every sampler). Unknown nodes or inputs raise."""
    node_ref, input_name = split_target(target)
    if node_ref == "*":
        found = [(i, input_name) for i, n in prompt.items()
                 if input_name in n["inputs"] and not is_link(n["inputs"][input_name])]
        if not found:
            raise WorkflowError(f"'{target}': no node of the workflow has a constant input '{input_name}'")
        return found
    node_id = find_node(prompt, node_ref)
    check_input_exists(prompt, node_id, input_name, object_info)
    return [(node_id, input_name)]


def check_input_exists(prompt: dict, node_id: str, input_name: str, object_info: dict | None = None) -> None:
    node = prompt[node_id]
    known = set(node["inputs"])
    spec = (object_info or {}).get(node["class_type"])
    if spec:
        for section in ("required", "optional"):
            known.update((spec.get("input") or {}).get(section, {}) or {})
    if input_name not in known:
        names = ", ".join(sorted(known)) or "(none)"
        raise WorkflowError(f"{node_label(prompt, node_id)} has no input '{input_name}'. Its inputs: {names}")
    if is_link(node["inputs"].get(input_name)):
        source = node["inputs"][input_name][0]
        raise WorkflowError(f"{node_label(prompt, node_id)}: input '{input_name}' is connected to node {source}, "
                            "not a value; set a value on the node that feeds it instead")


def apply_overrides(prompt: dict, overrides: list[tuple[str, str, Any]], object_info: dict | None = None) -> dict:
    """A copy of ``prompt`` with every (node ref, input, value) set; unknown nodes/inputs raise."""
    out = copy.deepcopy(prompt)
    for node_ref, input_name, value in overrides:
        for node_id, name in resolve_target(out, f"{node_ref}.{input_name}", object_info):
            out[node_id]["inputs"][name] = value
    return out


def load_image_nodes(prompt: dict) -> list[str]:
    return [i for i, n in prompt.items() if n["class_type"] == "LoadImage"]


def image_node(prompt: dict, ref: str | None) -> str:
    """The node that receives a picture: the given one, or the workflow's only LoadImage."""
    if ref:
        node_id = find_node(prompt, ref)
        if "image" not in prompt[node_id]["inputs"]:
            raise WorkflowError(f"{node_label(prompt, node_id)} has no 'image' input to receive a picture; "
                                "pick a LoadImage node")
        return node_id
    nodes = load_image_nodes(prompt)
    if len(nodes) == 1:
        return nodes[0]
    if not nodes:
        raise WorkflowError("the workflow has no LoadImage node to receive the pictures")
    labels = ", ".join(node_label(prompt, i) for i in nodes)
    raise WorkflowError(f"the workflow has several LoadImage nodes ({labels}); say which with --image-node")


def add_preview(prompt: dict, node_id: str, output_index: int = 0, overrides: dict | None = None) -> str:
    """Make ``node_id``'s output ``output_index`` an output of the prompt and return the new node id.

    With ``overrides`` the node is first cloned with those inputs changed (e.g. BEN2 with ``invert``
    off to get the cut-out when the workflow itself uses the inverted mask); ComfyUI runs the clone
    next to the original. A PreviewImage (temp folder, nothing left in the user's output) is added.
    """
    source = node_id
    if overrides:
        source = _free_id(prompt)
        clone = copy.deepcopy(prompt[node_id])
        for name, value in overrides.items():
            check_input_exists(prompt, node_id, name)
            clone["inputs"][name] = value
        clone.setdefault("_meta", {})["title"] = f"{title_of(prompt, node_id) or node_id} (client copy)"
        prompt[source] = clone
    preview = _free_id(prompt)
    prompt[preview] = {"class_type": "PreviewImage", "inputs": {"images": [source, output_index]},
                       "_meta": {"title": f"client output of {source}"}}
    return preview


def _free_id(prompt: dict) -> str:
    numeric = [int(i) for i in prompt if str(i).isdigit()]
    candidate = max(numeric, default=0) + 1
    while str(candidate) in prompt:
        candidate += 1
    return str(candidate)
