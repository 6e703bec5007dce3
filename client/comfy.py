"""An asyncio client for one ComfyUI server: queue, follow, fetch, interrupt.

How a prompt is followed, and why:

* The prompt id is chosen here and the prompt is registered before it is posted, so no WebSocket
  message can arrive for a prompt nobody is listening to yet.
* One WebSocket per server (``/ws?clientId=``) carries every prompt this client queued there; ComfyUI
  sends execution messages only to the client id that queued the prompt.
* The WebSocket is a fast path, not the source of truth: when it drops, the client reconnects with
  backoff and polls ``/history/{id}``, which ComfyUI writes when a prompt ends. ``execution_success``
  is sent *before* the history entry is written, so completion is confirmed by reading history.
* A server that stops answering HTTP raises :class:`ServerUnavailable`; one whose WebSocket stays
  silent for longer than the stall timeout while the prompt is unfinished raises
  :class:`ServerStalled` (after a best-effort cancel); one that forgot the prompt (restarted) raises
  :class:`PromptLost`. All three say "try elsewhere", never "the item is bad".
* A prompt whose caller gives up (the awaiting task is cancelled: a timeout, a disconnected HTTP
  client, Ctrl-C) is removed from ComfyUI's queue, or interrupted if it is the one running; ComfyUI
  0.3.64's ``/interrupt`` takes the prompt id and leaves other prompts alone.
* Pictures can come back without files: a ``SaveImageWebsocket`` node (shipped in ComfyUI's own
  ``custom_nodes``) sends them as binary WebSocket frames. The client announces
  ``supports_preview_metadata``, so each frame carries its prompt id and node id; frames from servers
  that send none are matched to the prompt and node ComfyUI said it was executing (one socket keeps
  the order). ``wait(..., binary_nodes=...)`` keeps the frames of those nodes in
  :attr:`PromptResult.ws_images`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .errors import (
    ClientError,
    ExecutionFailed,
    ExecutionInterrupted,
    PromptLost,
    PromptRejected,
    ServerStalled,
    ServerUnavailable,
    format_execution_error,
    format_node_errors,
    node_label,
)
from .files import upload_name
from .validate import validate
from .workflow import title_of

EventCallback = Callable[[dict], None]
NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA = 1, 4  # ComfyUI's protocol.BinaryEventTypes


def normalize_url(url: str) -> str:
    """``127.0.0.1:8188`` → ``http://127.0.0.1:8188``; a URL that is not http(s) is refused."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"'{url}' is not a ComfyUI server URL (expected e.g. http://127.0.0.1:8188)")
    return url


@dataclass
class Timeouts:
    """Seconds. ``request`` bounds every HTTP call; ``stall`` is how long a running prompt may go
    without any WebSocket message before the server counts as hung."""

    connect: float = 5.0
    request: float = 30.0
    download: float = 120.0
    stall: float = 600.0
    poll: float = 5.0
    poll_ws_down: float = 1.0
    heartbeat: float = 10.0


@dataclass
class PromptResult:
    """What a finished prompt produced: ComfyUI's history entry plus when things happened."""

    prompt_id: str
    server: str
    outputs: dict
    cached: list = field(default_factory=list)
    queued_at: float = 0.0
    started_at: float | None = None
    finished_at: float = 0.0
    ws_images: dict[str, list[bytes]] = field(default_factory=dict)  # node id → pictures sent over the socket

    def images(self) -> list[tuple[str, dict]]:
        """(node id, ``{filename, subfolder, type}``) of every picture output, in node order."""
        found = []
        for node_id in sorted(self.outputs, key=lambda i: (int(i) if str(i).isdigit() else 1 << 30, str(i))):
            for ref in (self.outputs[node_id] or {}).get("images", []) or []:
                if isinstance(ref, dict) and ref.get("filename"):
                    found.append((str(node_id), ref))
        return found


class _Watch:
    """Messages for one prompt, fed by the WebSocket reader."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.last_message = time.monotonic()
        self.binary_nodes: set[str] = set()


class ComfyServer:
    """One ComfyUI server. Use as ``async with ComfyServer(url) as server:``."""

    def __init__(self, url: str, timeouts: Timeouts | None = None):
        self.url = normalize_url(url)
        self.timeouts = timeouts or Timeouts()
        self.client_id = uuid.uuid4().hex
        self.uploaded: set[str] = set()
        self._object_info: dict | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws_task: asyncio.Task | None = None
        self._ws_up = asyncio.Event()
        self._watches: dict[str, _Watch] = {}
        self._last_ws_message = time.monotonic()
        self._executing: tuple[str | None, str | None] = (None, None)
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> ComfyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect))

    async def close(self) -> None:
        self._closed = True
        if self._ws_task:
            self._ws_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ws_task
            self._ws_task = None
        if self._session:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"ComfyServer({self.url!r})"

    # -- HTTP -----------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, *, timeout: float | None = None, expect: str = "json",
                       ok_statuses: tuple = (200,), **kwargs) -> tuple[int, Any]:
        """One HTTP call; network failures and 5xx become :class:`ServerUnavailable`."""
        await self.start()
        total = timeout or self.timeouts.request
        try:
            async with self._session.request(method, self.url + path, timeout=aiohttp.ClientTimeout(
                    total=total, connect=self.timeouts.connect), **kwargs) as response:
                if response.status >= 500:
                    text = (await response.text(errors="replace"))[:300]
                    raise ServerUnavailable(f"ComfyUI at {self.url} answered {response.status} to {method} {path}: "
                                            f"{text.strip() or response.reason}")
                if expect == "bytes":
                    body: Any = await response.read()
                elif expect == "json":
                    raw = await response.read()
                    try:
                        body = json.loads(raw) if raw else None
                    except json.JSONDecodeError:
                        body = raw.decode("utf-8", "replace")
                else:
                    body = None
                if response.status not in ok_statuses and response.status != 400:
                    raise ClientError(f"ComfyUI at {self.url} answered {response.status} to {method} {path}: "
                                      f"{str(body)[:300]}")
                return response.status, body
        except asyncio.TimeoutError as exc:
            raise ServerUnavailable(f"ComfyUI at {self.url} did not answer {method} {path} within {total:g} s "
                                    "(hung or overloaded?)") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerUnavailable(f"ComfyUI at {self.url} does not answer ({type(exc).__name__}: {exc}). "
                                    "Is it running, and is the URL right?") from exc

    async def system_stats(self, timeout: float | None = None) -> dict:
        _, body = await self._request("GET", "/system_stats", timeout=timeout)
        if not isinstance(body, dict):
            raise ServerUnavailable(f"{self.url} answered /system_stats with something that is not ComfyUI's")
        return body

    async def object_info(self, refresh: bool = False) -> dict:
        """All node classes (cached: the full answer is ~0.5 MB)."""
        if self._object_info is None or refresh:
            _, body = await self._request("GET", "/object_info", timeout=max(self.timeouts.request, 60))
            if not isinstance(body, dict):
                raise ServerUnavailable(f"{self.url} answered /object_info with something that is not ComfyUI's")
            self._object_info = body
        return self._object_info

    async def node_info(self, class_type: str, timeout: float | None = None) -> dict | None:
        """``/object_info/{class}``: the class's spec, or None when the server lacks it."""
        _, body = await self._request("GET", f"/object_info/{class_type}", timeout=timeout)
        return body.get(class_type) if isinstance(body, dict) else None

    async def queue_state(self) -> dict:
        _, body = await self._request("GET", "/queue")
        return body if isinstance(body, dict) else {}

    async def history(self, prompt_id: str) -> dict | None:
        _, body = await self._request("GET", f"/history/{prompt_id}")
        return body.get(prompt_id) if isinstance(body, dict) else None

    async def view(self, ref: dict) -> bytes:
        params = {"filename": ref["filename"], "subfolder": ref.get("subfolder", ""), "type": ref.get("type", "output")}
        _, body = await self._request("GET", "/view", params=params, expect="bytes", timeout=self.timeouts.download)
        return body

    async def upload_image(self, data: bytes, hint: str = "picture.png") -> str:
        """Upload to ComfyUI's input folder under a content-derived name, never overwriting.

        Returns the value for LoadImage's ``image`` input (ComfyUI may rename on a clash; its answer
        is used).
        """
        name = upload_name(data, hint)
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
        form.add_field("type", "input")
        form.add_field("overwrite", "false")
        status, body = await self._request("POST", "/upload/image", data=form, timeout=self.timeouts.download)
        if status != 200 or not isinstance(body, dict) or "name" not in body:
            raise ClientError(f"ComfyUI at {self.url} refused the upload of '{hint}' ({status}: {str(body)[:200]})")
        value = f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]
        self.uploaded.add(value)
        return value

    async def interrupt(self, prompt_id: str | None = None) -> None:
        await self._request("POST", "/interrupt", json={"prompt_id": prompt_id} if prompt_id else {}, expect="none")

    async def cancel(self, prompt_id: str) -> None:
        """Remove a queued prompt and interrupt it if it is running (ComfyUI ignores unknown ids).

        Deleting first and interrupting second leaves no gap: a prompt that starts between the two
        calls is caught by the interrupt, which only acts on the running prompt with this id.
        """
        await self._request("POST", "/queue", json={"delete": [prompt_id]}, expect="none")
        await self.interrupt(prompt_id)

    async def delete_history(self, prompt_id: str) -> None:
        """Forget a finished prompt (ComfyUI keeps up to 10,000 in memory, pictures sent as base64 included)."""
        await self._request("POST", "/history", json={"delete": [prompt_id]}, expect="none")

    async def abandon(self, prompt_id: str) -> None:
        """Best-effort :meth:`cancel` for a caller that gave up: bounded in time, never raises."""
        with contextlib.suppress(ClientError, asyncio.TimeoutError):
            await asyncio.wait_for(self.cancel(prompt_id), self.timeouts.connect + 5)

    # -- WebSocket --------------------------------------------------------------------------------

    async def _ensure_ws(self) -> None:
        if self._ws_task is None or self._ws_task.done():
            self._ws_task = asyncio.create_task(self._ws_loop(), name=f"ws {self.url}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ws_up.wait(), self.timeouts.connect)

    async def _ws_loop(self) -> None:
        delay = 0.1
        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        while not self._closed:
            try:
                ws = await asyncio.wait_for(self._session.ws_connect(
                    ws_url, heartbeat=self.timeouts.heartbeat, max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=self.timeouts.connect)), self.timeouts.connect)
                async with ws:
                    # must be the first message: pictures then carry their prompt and node ids
                    await ws.send_str(json.dumps({"type": "feature_flags",
                                                  "data": {"supports_preview_metadata": True}}))
                    self._ws_up.set()
                    delay = 0.1
                    self._broadcast({"type": "_ws_connected"})
                    async for message in ws:
                        self._last_ws_message = time.monotonic()
                        if message.type == aiohttp.WSMsgType.TEXT:
                            with contextlib.suppress(json.JSONDecodeError):
                                self._dispatch(json.loads(message.data))
                        elif message.type == aiohttp.WSMsgType.BINARY:
                            self._dispatch_binary(message.data)
                        elif message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                            break
            except asyncio.CancelledError:
                raise
            except NETWORK_ERRORS:
                pass
            if self._ws_up.is_set():
                self._ws_up.clear()
                self._broadcast({"type": "_ws_lost"})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _dispatch(self, message: dict) -> None:
        data = message.get("data")
        if not isinstance(data, dict):
            return
        if message.get("type") == "executing":
            self._executing = (data.get("prompt_id"), None if data.get("node") is None else str(data["node"]))
        elif message.get("type") == "execution_start":
            self._executing = (data.get("prompt_id"), None)
        watch = self._watches.get(str(data.get("prompt_id")))
        if watch is not None:
            watch.last_message = time.monotonic()
            watch.queue.put_nowait(message)

    def _dispatch_binary(self, frame: bytes) -> None:
        """A picture frame: ``[event][metadata length][metadata JSON][image]`` (event 4) or
        ``[event][format][image]`` (event 1, attributed to the prompt and node being executed)."""
        if len(frame) < 8:
            return
        event = struct.unpack(">I", frame[:4])[0]
        if event == PREVIEW_IMAGE_WITH_METADATA:
            length = struct.unpack(">I", frame[4:8])[0]
            try:
                meta = json.loads(frame[8:8 + length])
            except (json.JSONDecodeError, UnicodeDecodeError):
                return
            prompt_id, node, image = meta.get("prompt_id"), meta.get("node_id"), frame[8 + length:]
        elif event == PREVIEW_IMAGE:
            (prompt_id, node), image = self._executing, frame[8:]
        else:
            return
        watch = self._watches.get(str(prompt_id))
        if watch is not None:
            watch.last_message = time.monotonic()
            if node is not None and str(node) in watch.binary_nodes:
                watch.queue.put_nowait({"type": "_image", "data": {"node": str(node), "image": bytes(image)}})

    def _broadcast(self, message: dict) -> None:
        for watch in self._watches.values():
            watch.queue.put_nowait(message)

    @property
    def ws_connected(self) -> bool:
        return self._ws_up.is_set()

    # -- prompts ----------------------------------------------------------------------------------

    async def submit(self, prompt: dict, prompt_id: str | None = None) -> str:
        """``POST /prompt``; a 400 becomes :class:`PromptRejected` with one line per node error."""
        prompt_id = prompt_id or str(uuid.uuid4())
        await self._ensure_ws()
        self._watches.setdefault(prompt_id, _Watch())
        body = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        try:
            status, answer = await self._request("POST", "/prompt", json=body)
        except BaseException:
            self._watches.pop(prompt_id, None)
            raise
        if status == 400 or not isinstance(answer, dict) or "prompt_id" not in answer:
            self._watches.pop(prompt_id, None)
            answer = answer if isinstance(answer, dict) else {"error": str(answer)}
            raise PromptRejected(format_node_errors(answer, prompt, self.url))
        return str(answer["prompt_id"])

    async def wait(self, prompt_id: str, prompt: dict | None = None, on_event: EventCallback | None = None,
                   queued_at: float | None = None, binary_nodes: set[str] | None = None) -> PromptResult:
        """Follow a submitted prompt to its end; see the module docstring for the failure rules."""
        watch = self._watches.setdefault(prompt_id, _Watch())
        watch.binary_nodes = {str(n) for n in binary_nodes or ()}
        emit = _emitter(on_event, self.url, prompt_id, prompt)
        result = PromptResult(prompt_id, self.url, {}, queued_at=queued_at or time.time())
        next_poll = time.monotonic() + self.timeouts.poll
        # History is written by ComfyUI's worker as soon as the prompt ends, while its WebSocket messages
        # (pictures included) may still wait in the server's send queue: when pictures are expected over the
        # socket, a finished history entry waits for the end message (bounded) so no picture is left behind.
        ended: dict | None = None
        ended_by = 0.0
        dropped = False
        try:
            while True:
                interval = self.timeouts.poll if self.ws_connected else self.timeouts.poll_ws_down
                timeout = max(0.05, min(next_poll - time.monotonic(), interval))
                try:
                    message = await asyncio.wait_for(watch.queue.get(), timeout)
                except asyncio.TimeoutError:
                    message = None
                if message is not None:
                    kind, data = message.get("type"), message.get("data") or {}
                    if kind == "_ws_lost":
                        emit("ws_lost")
                        dropped = True  # what the socket carried meanwhile is gone: history decides
                        if ended is not None:
                            return self._finish(ended, prompt, result, emit)
                        next_poll = time.monotonic() + self.timeouts.poll_ws_down
                        continue
                    if kind == "_ws_connected":
                        emit("ws_connected")
                        next_poll = time.monotonic()  # catch up on what the drop hid
                        continue
                    if kind == "_image":
                        result.ws_images.setdefault(data["node"], []).append(data["image"])
                        continue
                    done = self._handle_message(kind, data, prompt, result, emit)
                    if done:
                        entry = ended or await self._history_after_end(prompt_id)
                        if entry is not None:
                            return self._finish(entry, prompt, result, emit)
                    continue
                if ended is not None:
                    if time.monotonic() >= ended_by:
                        return self._finish(ended, prompt, result, emit)
                    continue
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + interval
                    entry = await self.history(prompt_id)
                    if entry is not None and _entry_finished(entry):
                        if watch.binary_nodes and self.ws_connected and not dropped:
                            ended, ended_by = entry, time.monotonic() + self.timeouts.request
                            next_poll = ended_by
                            continue
                        return self._finish(entry, prompt, result, emit)
                    await self._check_alive(prompt_id, watch)
        finally:
            self._watches.pop(prompt_id, None)

    def _handle_message(self, kind: str, data: dict, prompt: dict | None, result: PromptResult, emit) -> bool:
        """Turn one WS message into an event; True when the prompt has ended successfully."""
        if kind == "execution_start":
            result.started_at = time.time()
            emit("started")
        elif kind == "execution_cached":
            result.cached = [str(n) for n in data.get("nodes") or []]
            emit("cached", nodes=result.cached)
        elif kind == "executing":
            node = data.get("node")
            if node is None:
                return True
            emit("executing", node=str(node), title=_title(prompt, node))
        elif kind == "progress":
            node = data.get("node")
            emit("progress", node=str(node) if node is not None else None, title=_title(prompt, node),
                 value=data.get("value"), max=data.get("max"))
        elif kind == "executed":
            emit("executed", node=str(data.get("node")), title=_title(prompt, data.get("node")),
                 output=data.get("output"))
        elif kind == "execution_error":
            raise ExecutionFailed(format_execution_error(data, prompt, self.url), str(data.get("node_id")),
                                  data.get("exception_type"))
        elif kind == "execution_interrupted":
            raise ExecutionInterrupted(f"the prompt was interrupted on ComfyUI at {self.url} at "
                                       f"{node_label(prompt, data.get('node_id'))}")
        elif kind == "execution_success":
            return True
        return False

    async def _history_after_end(self, prompt_id: str) -> dict | None:
        """History is written just after the end messages; give it a moment."""
        delay = 0.02
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            entry = await self.history(prompt_id)
            if entry is not None and _entry_finished(entry):
                return entry
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        return None

    async def _check_alive(self, prompt_id: str, watch: _Watch) -> None:
        """Between polls: is the prompt still known, and has the server said anything lately?"""
        state = await self.queue_state()
        items = list(state.get("queue_running") or []) + list(state.get("queue_pending") or [])
        known = any(isinstance(item, (list, tuple)) and len(item) > 1 and str(item[1]) == prompt_id for item in items)
        if not known:
            entry = await self.history(prompt_id)  # it may have ended between the two calls
            if entry is None:
                raise PromptLost(f"ComfyUI at {self.url} no longer knows prompt {prompt_id} "
                                 "(it restarted or its queue was cleared)")
            return
        silent = time.monotonic() - max(watch.last_message, self._last_ws_message)
        if silent > self.timeouts.stall:
            with contextlib.suppress(ClientError):
                await self.cancel(prompt_id)
            raise ServerStalled(f"ComfyUI at {self.url} sent nothing about prompt {prompt_id} for {silent:.0f} s "
                                f"(stall timeout {self.timeouts.stall:g} s); treating the server as hung")

    def _finish(self, entry: dict, prompt: dict | None, result: PromptResult, emit) -> PromptResult:
        status = entry.get("status") or {}
        if status.get("status_str") == "error" or status.get("completed") is False:
            for message in status.get("messages") or []:
                if isinstance(message, (list, tuple)) and len(message) == 2:
                    if message[0] == "execution_error":
                        data = message[1]
                        raise ExecutionFailed(format_execution_error(data, prompt, self.url),
                                              str(data.get("node_id")), data.get("exception_type"))
                    if message[0] == "execution_interrupted":
                        raise ExecutionInterrupted(f"the prompt was interrupted on ComfyUI at {self.url}")
            raise ExecutionFailed(f"the prompt failed on ComfyUI at {self.url} (status {status})")
        result.outputs = entry.get("outputs") or {}
        result.finished_at = time.time()
        emit("finished", outputs=len(result.images()))
        return result

    async def run(self, prompt: dict, on_event: EventCallback | None = None, check: bool = True,
                  queued_at: float | None = None, binary_nodes: set[str] | None = None,
                  prompt_id: str | None = None) -> PromptResult:
        """Validate against ``/object_info``, queue, and follow one prompt to its end.

        If the caller gives up (this coroutine is cancelled), the prompt is removed from ComfyUI's
        queue or interrupted before the cancellation goes on. ``prompt_id`` lets the caller know the
        id before queueing (it is chosen here otherwise).
        """
        if check:
            validate(prompt, await self.object_info(), self.url, self.uploaded)
        if binary_nodes:  # the pictures come back over the socket only: it must be up before the prompt runs
            await self._ensure_ws()
            if not self.ws_connected:
                raise ServerUnavailable(f"the WebSocket to ComfyUI at {self.url} does not connect within "
                                        f"{self.timeouts.connect:g} s; the pictures would come back over it")
        queued_at = queued_at or time.time()
        prompt_id = prompt_id or str(uuid.uuid4())
        try:
            await self.submit(prompt, prompt_id)
            if on_event:
                on_event({"event": "queued", "server": self.url, "prompt_id": prompt_id})
            return await self.wait(prompt_id, prompt, on_event, queued_at, binary_nodes)
        except asyncio.CancelledError:
            await asyncio.shield(self.abandon(prompt_id))
            raise


def _entry_finished(entry: dict) -> bool:
    status = entry.get("status")
    return status is None or bool(status.get("completed")) or status.get("status_str") in ("success", "error")


def _title(prompt: dict | None, node: Any) -> str | None:
    if prompt is None or node is None or str(node) not in prompt:
        return None
    return title_of(prompt, str(node)) or prompt[str(node)].get("class_type")


def _emitter(on_event: EventCallback | None, server: str, prompt_id: str, prompt: dict | None):
    def emit(kind: str, **fields) -> None:
        if on_event is not None:
            on_event({"event": kind, "server": server, "prompt_id": prompt_id, **fields})
    return emit
