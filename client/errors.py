"""Errors the client raises, and readable text for ComfyUI's own error payloads.

Every error here carries a message meant for a person: what was wrong, where (node title and id,
input, server) and what to do. The split between classes is what the batch runner needs to decide
what to do next: a ``ServerUnavailable`` says nothing about the item (requeue it elsewhere), while
``PromptRejected`` / ``ExecutionFailed`` are about the item and count towards its retry limit.
"""

from __future__ import annotations


class ClientError(Exception):
    """A problem the user can fix; ``str()`` is the whole readable message."""


class WorkflowError(ClientError):
    """The workflow file, a ``--set``/``--image`` option or an input file is wrong."""


class ValidationFailed(ClientError):
    """The prompt does not fit the server's ``/object_info``; nothing was queued.

    ``problems`` holds one :class:`Problem` per issue so callers (the HTTP API) can map a problem
    back to the request parameter that caused it.
    """

    def __init__(self, server: str, problems: list[Problem]):
        self.server = server
        self.problems = problems
        lines = "\n".join(f"  - {p.text}" for p in problems)
        super().__init__(f"the workflow does not fit ComfyUI at {server} ({len(problems)} problem(s)); "
                         f"nothing was queued:\n{lines}")

    def __reduce__(self):  # the default pickles ``args`` (the message), which this ``__init__`` does not take
        return type(self), (self.server, self.problems)


class Problem:
    """One validation problem, located at a node and (optionally) one of its inputs."""

    __slots__ = ("node_id", "input", "text")

    def __init__(self, node_id: str | None, input_name: str | None, text: str):
        self.node_id = node_id
        self.input = input_name
        self.text = text

    def __repr__(self) -> str:
        return f"Problem({self.node_id!r}, {self.input!r}, {self.text!r})"


class ServerUnavailable(ClientError):
    """The server did not answer (refused, reset, timed out): retry elsewhere or later."""


class ServerStalled(ServerUnavailable):
    """The server answers nothing about a running prompt for longer than the stall timeout."""


class PromptLost(ServerUnavailable):
    """The server no longer knows the prompt (it restarted or its queue was cleared)."""


class PromptRejected(ClientError):
    """``POST /prompt`` answered 400: ComfyUI's validation refused the prompt."""


class ExecutionFailed(ClientError):
    """A node raised while the prompt ran (``execution_error``)."""

    def __init__(self, message: str, node_id: str | None = None, exception_type: str | None = None):
        super().__init__(message)
        self.node_id = node_id
        self.exception_type = exception_type

    def __reduce__(self):  # errors cross process boundaries (a Ray actor's answer): keep every field
        return type(self), (str(self), self.node_id, self.exception_type)


class ExecutionInterrupted(ClientError):
    """The prompt was interrupted (``/interrupt`` or Cancel in the web UI)."""


def node_label(prompt: dict | None, node_id) -> str:
    """``node 6 'Repaint the background' (EditKitFluxFillInpaint)``: how every message names a node."""
    node_id = str(node_id)
    node = (prompt or {}).get(node_id)
    if not isinstance(node, dict):
        return f"node {node_id}"
    title = (node.get("_meta") or {}).get("title")
    class_type = node.get("class_type", "?")
    return f"node {node_id} '{title}' ({class_type})" if title else f"node {node_id} ({class_type})"


def _error_text(error: dict) -> str:
    message = str(error.get("message") or error.get("type") or "error")
    details = str(error.get("details") or "")
    extra = error.get("extra_info") or {}
    input_name = extra.get("input_name") if isinstance(extra, dict) else None
    text = message
    if details and details not in message and details != input_name:
        text += f": {details}"
    if input_name and input_name not in text:
        text = f"input '{input_name}': {text}"
    return text


def format_node_errors(body: dict, prompt: dict | None, server: str) -> str:
    """Readable text for a 400 answer of ``POST /prompt`` (``{"error": ..., "node_errors": ...}``)."""
    lines = []
    error = body.get("error")
    node_errors = body.get("node_errors") or {}
    for node_id, entry in node_errors.items():
        for item in (entry or {}).get("errors", []):
            lines.append(f"  - {node_label(prompt, node_id)}: {_error_text(item)}")
    if isinstance(error, dict):
        head = _error_text(error)
        if not node_errors and error.get("details"):
            # graph-level errors name the node only in ``details`` ("Node ID '#2'")
            head = f"{error.get('message')} ({error.get('details')})"
    else:
        head = str(error or "the prompt was refused")
    text = f"ComfyUI at {server} refused the prompt: {head}"
    return text + ("\n" + "\n".join(lines) if lines else "")


def format_execution_error(data: dict, prompt: dict | None, server: str) -> str:
    """Readable text for an ``execution_error`` message: node, exception, and the last traceback line."""
    node_id = data.get("node_id")
    label = node_label(prompt, node_id) if node_id is not None else "a node"
    exc_type = data.get("exception_type") or "error"
    message = str(data.get("exception_message") or "").strip()
    traceback = data.get("traceback") or []
    where = ""
    if traceback:
        last = str(traceback[-1]).strip().splitlines()
        where = f"\n    (last traceback line: {last[-1].strip()})" if last else ""
    return f"{label} failed on ComfyUI at {server}: {exc_type}: {message}{where}"
