"""One API request's prompt: a route's workflow with the request's values, pictures and outputs filled in.

``serve`` does not leave files in ComfyUI's folders (unless ``--keep-files``): ComfyUI has no endpoint
to delete an uploaded or saved picture, and ``serve`` may run on another machine than the server, so
instead nothing is written there in the first place:

* a picture that would be uploaded for a Load Image node travels inside the prompt: the node is
  replaced by EditKit's base64 loader (``EditKitLoadImageBase64``: the same IMAGE and MASK outputs,
  MASK = 1 - alpha as Load Image), and text inputs meant for base64 get the text;
* the answer's pictures come back over the WebSocket: the output nodes the answer needs become
  ``SaveImageWebsocket`` (shipped in ComfyUI's ``custom_nodes``), the workflow's other output nodes
  are dropped (their work is not needed); a server without that node gets ``PreviewImage`` instead,
  whose files go to ComfyUI's temp folder, emptied at each start;
* the prompt's history entry (which holds the base64 picture) is deleted after the answer.

With ``--keep-files`` the workflow runs as written: pictures are uploaded to ComfyUI's ``input/`` and
its save nodes write to ``output/``, where they stay.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import node_label
from .experiments import Route
from .validate import _inputs_spec, _kind_and_options

WEBSOCKET_OUTPUT = "SaveImageWebsocket"
BASE64_LOADER = "EditKitLoadImageBase64"
FILE_OUTPUTS = {"SaveImage", "PreviewImage", "SaveAnimatedWEBP", "SaveAnimatedPNG"}


class BadValue(ValueError):
    """A request value that does not fit the node input it goes to; the message names the field."""


def fill(route: Route, values: dict[str, Any]) -> dict:
    """A copy of the route's workflow with each request value at its targets."""
    prompt = copy.deepcopy(route.prompt)
    for parameter, value in values.items():
        for node_id, input_name in route.targets.get(parameter, []):
            prompt[node_id]["inputs"][input_name] = value
    return prompt


def check_values(route: Route, values: dict[str, Any], prompt: dict, object_info: dict) -> None:
    """Numbers against the target inputs' min, max and step (ComfyUI does not check step; the nodes
    fail on a width that is not a multiple of 16, so it is checked here, naming the request field)."""
    for parameter, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for node_id, input_name in route.targets.get(parameter, []):
            spec = object_info.get(prompt[node_id]["class_type"])
            if not spec:
                continue
            raw = _inputs_spec(spec).get(input_name)
            if raw is None:
                continue
            kind, options = _kind_and_options(raw[1])
            where = f"{node_label(prompt, node_id)} input '{input_name}'"
            low, high, step = options.get("min"), options.get("max"), options.get("step")
            if (low is not None and value < low) or (high is not None and value > high):
                raise BadValue(f"'{parameter}' must be between {low} and {high} here (it sets {where}), got {value}")
            if kind == "INT" and isinstance(step, int) and step > 1:
                base = low if isinstance(low, int) and low % step else 0
                if (value - base) % step:
                    lower = value - (value - base) % step
                    raise BadValue(f"'{parameter}' must be a multiple of {step} (it sets {where}), got {value}: "
                                   f"use {lower} or {lower + step}")


def without_files(prompt: dict, pictures: dict[tuple[str, str], str], wanted: dict[str, str], websocket: bool,
                  max_pixels: int) -> None:
    """Rewrite ``prompt`` in place as the module docstring says.

    ``pictures``: (node id, input) → base64 text of the request's picture for that input; ``wanted``:
    answer key → output node id (kept; every other file-writing output node is removed).
    """
    for (node_id, input_name), text in pictures.items():
        node = prompt[node_id]
        if node["class_type"] == "LoadImage" and input_name == "image":
            prompt[node_id] = {"class_type": BASE64_LOADER, "inputs": {"data": text, "max_pixels": max_pixels},
                               "_meta": dict(node.get("_meta") or {})}
        else:
            node["inputs"][input_name] = text
    keep = set(wanted.values())
    for node_id in [i for i, n in prompt.items() if n["class_type"] in FILE_OUTPUTS and i not in keep]:
        del prompt[node_id]
    for node_id in keep:
        node = prompt[node_id]
        if node["class_type"] in FILE_OUTPUTS and "images" in node["inputs"]:
            prompt[node_id] = {"class_type": WEBSOCKET_OUTPUT if websocket else "PreviewImage",
                               "inputs": {"images": node["inputs"]["images"]}, "_meta": dict(node.get("_meta") or {})}
