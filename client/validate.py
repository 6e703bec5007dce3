"""Check a prompt against a server's ``/object_info`` before queueing it.

ComfyUI validates on ``POST /prompt`` too, but it stops at the first unknown node class and words
its answers for the web UI. Checking here first gives one line per problem (unknown class, a model
file that is not in the combo list, a link to an output of the wrong type, a missing input, a value
out of range), naming the node by title and id, and lets the batch runner tell "this server lacks a
model" (drop the server) from "this item is wrong" (fail the item). The rules follow
``execution.validate_inputs`` of ComfyUI 0.3.64: only output nodes and their ancestors are checked,
types match when equal, when either side is ``*`` or when comma-separated type sets intersect.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import Problem, ValidationFailed, node_label
from .workflow import is_link

PREVIEW_CHOICES = 8


def _inputs_spec(spec: dict) -> dict[str, tuple[str, Any]]:
    merged = {}
    for section in ("required", "optional"):
        for name, value in ((spec.get("input") or {}).get(section) or {}).items():
            merged[name] = (section, value)
    return merged


def _kind_and_options(value: Any) -> tuple[Any, dict]:
    """``["INT", {...}]`` / ``[[choices], {...}]`` / ``["COMBO", {"options": [...]}]`` → (kind, options)."""
    if isinstance(value, (list, tuple)) and value:
        kind = value[0]
        options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
    else:
        kind, options = value, {}
    if kind == "COMBO" and isinstance(options.get("options"), list):
        kind = options["options"]
    return kind, options


def _types_match(received: str, expected: str) -> bool:
    if received == expected or "*" in (received, expected):
        return True
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def _choices_text(choices: list) -> str:
    if not choices:
        return "the server offers no choices (the folder it lists is empty)"
    shown = ", ".join(repr(c) for c in choices[:PREVIEW_CHOICES])
    more = f", … ({len(choices)} in all)" if len(choices) > PREVIEW_CHOICES else ""
    return f"choices: {shown}{more}"


def _check_constant(label: str, name: str, kind: Any, options: dict, value: Any, known_images: set) -> str | None:
    if isinstance(kind, list):
        if value in kind:
            return None
        if options.get("image_upload"):
            if value in known_images:
                return None
            return (f"{label}: input '{name}': picture {value!r} is not in the server's input folder; "
                    "pass it with --image NODE=PATH (the client uploads it)")
        looks_like_file = isinstance(value, str) and re.search(r"\.[A-Za-z0-9]{1,12}$", value) is not None
        hint = (" The file is missing on the server: put it in the models folder this node reads "
                "(see the README's model table) and refresh or restart ComfyUI." if looks_like_file else "")
        return f"{label}: input '{name}': {value!r} is not one of the server's values ({_choices_text(kind)}).{hint}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{label}: input '{name}': {value!r} is not a number ({kind} expected)"
        if kind == "INT" and float(value) != int(value):
            return f"{label}: input '{name}': {value!r} is not a whole number"
        if options.get("min") is not None and value < options["min"]:
            return f"{label}: input '{name}': {value} is smaller than the minimum {options['min']}"
        if options.get("max") is not None and value > options["max"]:
            return f"{label}: input '{name}': {value} is bigger than the maximum {options['max']}"
    elif kind == "STRING" and not isinstance(value, str):
        return f"{label}: input '{name}': {value!r} is not text"
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{label}: input '{name}': {value!r} is not true/false"
    elif isinstance(kind, str) and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "*") and "," not in kind:
        return f"{label}: input '{name}' expects a connection from a {kind} output, got the value {value!r}"
    return None


def find_problems(prompt: dict, object_info: dict, known_images: set | frozenset = frozenset()) -> list[Problem]:
    """Every problem of ``prompt`` against ``object_info`` (empty list: it will be accepted)."""
    problems: list[Problem] = []
    for node_id, node in prompt.items():
        if node["class_type"] not in object_info:
            problems.append(Problem(node_id, None, f"{node_label(prompt, node_id)}: the server has no node class "
                                    f"'{node['class_type']}'. Is the custom node pack that provides it installed "
                                    "(EditKit nodes need this repository in ComfyUI's custom_nodes) and did it "
                                    "import without errors (look for IMPORT FAILED in ComfyUI's log)?"))
    if problems:
        return problems
    outputs = [i for i, n in prompt.items() if object_info[n["class_type"]].get("output_node")]
    if not outputs:
        return [Problem(None, None, "the workflow has no output node (SaveImage, PreviewImage, ...): "
                        "ComfyUI would run nothing")]
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        node = prompt[node_id]
        spec = object_info[node["class_type"]]
        label = node_label(prompt, node_id)
        for name, (section, raw) in _inputs_spec(spec).items():
            kind, options = _kind_and_options(raw)
            if name not in node["inputs"]:
                if section == "required":
                    problems.append(Problem(node_id, name, f"{label}: required input '{name}' is missing"))
                continue
            value = node["inputs"][name]
            if is_link(value):
                source_id = str(value[0])
                if source_id not in prompt:
                    problems.append(Problem(node_id, name, f"{label}: input '{name}' is connected to node "
                                            f"{source_id}, which is not in the workflow"))
                    continue
                source_outputs = object_info[prompt[source_id]["class_type"]].get("output") or []
                if not 0 <= value[1] < len(source_outputs):
                    problems.append(Problem(node_id, name, f"{label}: input '{name}' is connected to output "
                                            f"{value[1]} of {node_label(prompt, source_id)}, which has "
                                            f"{len(source_outputs)} output(s)"))
                    continue
                received = source_outputs[value[1]]
                expected = "COMBO" if isinstance(kind, list) else str(kind)
                if not _types_match(str(received), expected):
                    problems.append(Problem(node_id, name, f"{label}: input '{name}' expects {expected} but is "
                                            f"connected to a {received} output of {node_label(prompt, source_id)}"))
                stack.append(source_id)
                continue
            message = _check_constant(label, name, kind, options, value, set(known_images))
            if message:
                problems.append(Problem(node_id, name, message))
    problems.sort(key=lambda p: (int(p.node_id) if str(p.node_id).isdigit() else 1 << 30, str(p.node_id), p.input or ""))
    return problems


def validate(prompt: dict, object_info: dict, server: str, known_images: set | frozenset = frozenset()) -> None:
    """Raise :class:`ValidationFailed` listing every problem, or return quietly."""
    problems = find_problems(prompt, object_info, known_images)
    if problems:
        raise ValidationFailed(server, problems)
