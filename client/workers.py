"""How one item is rendered: the batch's job (workflow + settings → one prompt per item) and the workers
that run items on servers.

This is the seam between scheduling and execution. :class:`client.batch.BatchRunner` owns the queue,
retries, failure rules and the exactly-once recording of outputs; a :class:`Worker` only turns one
item into pictures on one server and says, through the exception it raises, what went wrong:

* :class:`~client.errors.ServerUnavailable` (and its subclasses): the server, not the item; the runner
  marks the worker down, requeues the item elsewhere and probes the worker until it answers again;
* :class:`~client.errors.WorkflowError` / :class:`~client.errors.ValidationFailed`: the item can never
  work (not a picture, a ``set`` that does not fit); it fails at once;
* any other :class:`~client.errors.ClientError` (refused prompt, node error): retried with backoff.

:class:`ComfyWorker` runs items on one ComfyUI server over HTTP. Another way to run items (e.g. an
actor that owns a ComfyUI server on a cluster node) is another class with the same four methods; the
runner does not change.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .comfy import ComfyServer, Timeouts
from .errors import WorkflowError
from .files import read_picture
from .items import Item
from .validate import validate
from .workflow import apply_overrides, find_node, image_node, is_link, split_target


def prompt_target(workflow: dict, target: str | None) -> tuple[str, str]:
    """Where a prompt line goes: ``--prompt-target`` or the only constant text input named prompt/text."""
    if target:
        node_ref, name = split_target(target)
        node_id = find_node(workflow, node_ref)
        if name not in workflow[node_id]["inputs"]:
            raise WorkflowError(f"--prompt-target '{target}': node {node_id} has no input '{name}'")
        return node_id, name
    found = [(i, name) for i, n in workflow.items() for name in ("prompt", "text")
             if isinstance(n["inputs"].get(name), str) and not is_link(n["inputs"][name])]
    if len(found) == 1:
        return found[0]
    if not found:
        raise WorkflowError("the workflow has no text input named 'prompt' or 'text'; say where prompts go with "
                            "--prompt-target NODE.INPUT")
    raise WorkflowError("the workflow has several prompt inputs (" + ", ".join(f"{i}.{n}" for i, n in found) +
                        "); say which with --prompt-target NODE.INPUT")


@dataclass
class Job:
    """The workflow and the settings every item shares; ``config`` fingerprints them for resume."""

    name: str
    workflow: dict
    global_sets: list = field(default_factory=list)
    image_node: str | None = None
    prompt_node: tuple[str, str] | None = None
    config: str = ""

    @classmethod
    def build(cls, name: str, workflow: dict, items: list[Item], global_sets: list | None = None,
              image_ref: str | None = None, prompt_ref: str | None = None) -> Job:
        """Resolve where pictures and prompt lines go; unknown nodes in the settings are errors now."""
        global_sets = list(global_sets or [])
        image = image_node(workflow, image_ref) if any(i.picture for i in items) else None
        prompt = prompt_target(workflow, prompt_ref) if any(i.prompt_text is not None for i in items) else None
        for node_ref, _, _ in global_sets:
            if node_ref != "*":
                find_node(workflow, node_ref)
        config = hashlib.sha256(json.dumps([workflow, [list(s) for s in global_sets], image, prompt],
                                           sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
        return cls(name, workflow, global_sets, image, prompt, config)

    def base_prompt(self, object_info: dict | None = None) -> dict:
        return apply_overrides(self.workflow, self.global_sets, object_info)

    def prompt_for(self, item: Item, object_info: dict | None = None) -> dict:
        """The item's prompt without its picture (see :meth:`picture_target`)."""
        prompt = self.base_prompt(object_info)
        if item.prompt_text is not None:
            node_id, name = self.prompt_node
            prompt[node_id]["inputs"][name] = item.prompt_text
        if item.sets:
            prompt = apply_overrides(prompt, [(*split_target(t), v) for t, v in item.sets.items()], object_info)
        return prompt

    def picture_target(self, prompt: dict) -> str:
        """The node whose ``image`` input receives the item's picture."""
        return self.image_node or image_node(prompt, None)


def check_job(job: Job, info: dict, server: str) -> None:
    """Raise ValidationFailed when a server with this ``/object_info`` can never run the job."""
    probe = job.base_prompt(info)
    uploaded_per_item = set()  # the workflow's own picture name: each item uploads its picture instead
    if job.image_node:
        uploaded_per_item.add(probe[job.image_node]["inputs"]["image"])
    validate(probe, info, server, known_images=uploaded_per_item)


@dataclass
class Rendered:
    """What a worker returns for one item: the attempt's id, where it ran, and its pictures in node order."""

    prompt_id: str
    server: str
    pictures: list[tuple[str, str, bytes]]  # (node id, file suffix, bytes)
    queued_at: float
    started_at: float | None
    finished_at: float


class Worker(Protocol):
    """One place items run (see the module docstring for what each exception means)."""

    name: str

    async def probe(self) -> None:
        """Return when the server answers; raise ServerUnavailable when it does not."""

    async def check(self, job: Job) -> None:
        """Raise ValidationFailed (or another ClientError) when this server can never run the job."""

    async def render(self, job: Job, item: Item) -> Rendered:
        """Run one item and return its pictures."""

    async def close(self) -> None:
        """Release connections."""


class ComfyWorker:
    """Runs items on one ComfyUI server: upload the picture, validate, queue, follow, download."""

    def __init__(self, url: str, timeouts: Timeouts | None = None):
        self.server = ComfyServer(url, timeouts)
        self.name = self.server.url

    async def probe(self) -> None:
        await self.server.system_stats(timeout=self.server.timeouts.connect + 2)

    async def check(self, job: Job) -> None:
        check_job(job, await self.server.object_info(refresh=True), self.server.url)

    async def render(self, job: Job, item: Item) -> Rendered:
        data = read_picture(Path(item.picture)) if item.picture is not None else None
        return await self.render_data(job, item, data)

    async def render_data(self, job: Job, item: Item, data: bytes | None) -> Rendered:
        """:meth:`render` with the item's picture already read (a cluster actor gets the bytes, not the path)."""
        server = self.server
        queued_at = time.time()
        info = await server.object_info()
        prompt = job.prompt_for(item, info)
        if item.picture is not None:
            target = job.picture_target(prompt)
            prompt[target]["inputs"]["image"] = await server.upload_image(data, Path(item.picture).name)
        validate(prompt, info, server.url, server.uploaded)
        result = await server.run(prompt, check=False, queued_at=queued_at)
        pictures = []
        for node_id, ref in result.images():
            pictures.append((node_id, Path(ref["filename"]).suffix or ".png", await server.view(ref)))
        return Rendered(result.prompt_id, server.url, pictures, result.queued_at, result.started_at,
                        result.finished_at)

    async def close(self) -> None:
        await self.server.close()
