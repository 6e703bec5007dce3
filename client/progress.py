"""Progress of running API requests, relayed to pages as server-sent events (``GET /api/progress/{id}``).

A caller picks an id for its request (``X-Request-Id`` on ``POST /api/edit_with_comfyui``) and follows
it with ``GET /api/progress/<id>``, before or while the request runs (a late subscriber gets the events
so far first). Events are JSON objects with a ``stage``:

* ``accepted`` — the request was read; ``queued`` — its prompt is in a ComfyUI server's queue (``server``,
  ``nodes``: how many nodes the prompt has); ``started``; ``cached`` (``nodes`` that need not run);
  ``executing`` (``node``, ``title``); ``progress`` (``value``, ``max``, ``node``, ``title``: a sampler's
  steps); ``finished``;
* and one last event: ``done`` (``status`` 200) or ``error`` (``status``, ``error``: the API's message).

The relay keeps the last :data:`KEEP` ids only (old finished ones go first), so ids cannot pile up.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time

KEEP = 256
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")
TERMINAL = ("done", "error")


class Channel:
    """The events of one request, in order, for any number of subscribers."""

    def __init__(self):
        self.events: list[dict] = []
        self.changed = asyncio.Event()
        self.touched = time.monotonic()

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1]["stage"] in TERMINAL

    def publish(self, event: dict) -> None:
        if self.ended:
            return
        self.events.append({"seq": len(self.events), **event})
        self.touched = time.monotonic()
        self.changed.set()
        self.changed = asyncio.Event()

    async def follow(self, idle_timeout: float):
        """Yield every event (those so far, then new ones) until the last one, or ``idle_timeout`` s of silence."""
        index = 0
        while True:
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.ended:
                return
            changed = self.changed
            try:
                await asyncio.wait_for(changed.wait(), idle_timeout)
            except asyncio.TimeoutError:
                return


class ProgressHub:
    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self.channels: collections.OrderedDict[str, Channel] = collections.OrderedDict()

    def channel(self, request_id: str) -> Channel:
        channel = self.channels.get(request_id)
        if channel is None:
            channel = self.channels[request_id] = Channel()
            while len(self.channels) > self.keep:
                ended = [key for key, c in self.channels.items() if c.ended]
                self.channels.pop(ended[0] if ended else next(iter(self.channels)))
        return channel


def comfy_event(event: dict, prompt: dict | None = None) -> dict | None:
    """A :class:`~client.comfy.ComfyServer` event as a progress event (None for those a page does not need)."""
    kind = event.get("event")
    if kind == "queued":
        return {"stage": "queued", "server": event.get("server"), "nodes": len(prompt or {})}
    if kind in ("started", "finished"):
        return {"stage": kind}
    if kind == "cached":
        return {"stage": "cached", "nodes": event.get("nodes") or []}
    if kind == "executing":
        return {"stage": "executing", "node": event.get("node"), "title": event.get("title")}
    if kind == "progress":
        return {"stage": "progress", "node": event.get("node"), "title": event.get("title"),
                "value": event.get("value"), "max": event.get("max")}
    return None
