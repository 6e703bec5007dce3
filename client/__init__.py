"""EditKit's client: run bundled workflows on ComfyUI servers, batch them, and serve the apps' HTTP API.

A separate package from the node pack: it imports neither torch nor ComfyUI (its dependencies are in
``requirements-client.txt``) and talks to ComfyUI only over HTTP and WebSocket, so it runs on any
machine that can reach a server. ``python -m client --help`` lists the commands.
"""

from .comfy import ComfyServer, PromptResult, Timeouts
from .errors import (
    ClientError,
    ExecutionFailed,
    ExecutionInterrupted,
    PromptLost,
    PromptRejected,
    ServerStalled,
    ServerUnavailable,
    ValidationFailed,
    WorkflowError,
)

__all__ = [
    "ClientError", "ComfyServer", "ExecutionFailed", "ExecutionInterrupted", "PromptLost", "PromptRejected",
    "PromptResult", "ServerStalled", "ServerUnavailable", "Timeouts", "ValidationFailed", "WorkflowError",
]
