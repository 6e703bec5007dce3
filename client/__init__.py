"""EditKit's client: run bundled workflows on ComfyUI servers, batch them, and serve the apps' HTTP API.

A separate package from the node pack: it imports neither torch nor ComfyUI (its dependencies are in
``requirements-client.txt``) and talks to ComfyUI only over HTTP and WebSocket, so it runs on any
machine that can reach a server. ``python -m client --help`` lists the commands.

The names below are imported on first use (PEP 562), so ``python -m client --help`` and each command
load only what they need (aiohttp, Pillow and numpy are not needed to print the help).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ComfyServer": "comfy", "PromptResult": "comfy", "Timeouts": "comfy",
    "ClientError": "errors", "ExecutionFailed": "errors", "ExecutionInterrupted": "errors", "PromptLost": "errors",
    "PromptRejected": "errors", "ServerStalled": "errors", "ServerUnavailable": "errors",
    "ValidationFailed": "errors", "WorkflowError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
