"""A fake ComfyUI server (test double) with ComfyUI 0.3.64's endpoints and message shapes.

Used by the client's tests and by ``scripts/benchmark_client.py``; it runs in a background thread with
its own event loop, so the code under test (in the test's loop or in a subprocess) talks to it over
real sockets on 127.0.0.1. It executes prompts one at a time, like ComfyUI's single worker, sending
the same WebSocket messages in the same order (``execution_start``, ``execution_cached``,
``executing``, ``progress``, ``executed``, ``execution_success`` or ``execution_error`` /
``execution_interrupted``, then ``executing`` with ``node: null`` after the history entry is
written). Save/Preview nodes "render" the picture of the LoadImage (or EditKit base64 loader) upstream
of them, colour-inverted, so a test can tell which input produced which output; one picture per
``batch_size`` of the sampler upstream. ``SaveImageWebsocket`` sends its pictures as binary frames the
way ComfyUI 0.3.64 does: with prompt and node ids when the client announced
``supports_preview_metadata`` (and ``Faults.ignore_feature_flags`` is off), else bare.

Faults, switched on through :attr:`FakeComfy.faults` or methods: an input text containing ``FAIL``
makes that node raise (``execution_error``); ``drop_ws_after`` closes every WebSocket after N
messages; :meth:`hang` makes the server accept connections but answer nothing; :meth:`kill` stops it
like a dead process (queue and history lost) and :meth:`revive` restarts it on the same port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web
from PIL import Image, ImageOps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def minimal_object_info(images: list[str] | None = None) -> dict:
    """Node specs for LoadImage → SaveImage/PreviewImage prompts, as ComfyUI 0.3.64 reports them."""
    return {
        "LoadImage": {"input": {"required": {"image": [sorted(images or []), {"image_upload": True}]}},
                      "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"], "output_node": False,
                      "name": "LoadImage", "category": "image"},
        "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                      "output": [], "output_name": [], "output_node": True, "name": "SaveImage", "category": "image"},
        "PreviewImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "output": [], "output_name": [],
                         "output_node": True, "name": "PreviewImage", "category": "image"},
        "SaveImageWebsocket": {"input": {"required": {"images": ["IMAGE", {}]}}, "output": [], "output_name": [],
                               "output_node": True, "name": "SaveImageWebsocket", "category": "api/image"},
    }


@dataclass
class Faults:
    drop_ws_after: int | None = None    # close each WebSocket after this many messages (once per connection)
    drop_ws_times: int = 1              # how many connections get dropped that way
    node_seconds: float = 0.0           # time each executed node takes
    steps: int = 2                      # progress messages per node that has a 'steps' input
    reject_with: dict | None = None     # answer every POST /prompt with this 400 body
    lose_history: bool = False          # forget finished prompts (as a restarted server)
    ignore_feature_flags: bool = False  # send bare picture frames (as a ComfyUI before preview metadata)
    frames_lag: float = 0.0             # write history this long before sending SaveImageWebsocket's pictures, as a
                                        # real server does when its send queue lags behind its worker


@dataclass
class _Queued:
    number: int
    prompt_id: str
    prompt: dict
    client_id: str | None
    outputs: list = field(default_factory=list)


class FakeComfy:
    def __init__(self, object_info: dict | None = None, port: int | None = None, faults: Faults | None = None):
        self.object_info = object_info or minimal_object_info()
        self.port = port or free_port()
        self.faults = faults or Faults()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.received: list[str] = []     # prompt ids posted
        self.prompts: dict[str, dict] = {}  # prompt id → the prompt posted (kept when history is deleted)
        self.executed: list[str] = []     # prompt ids that finished successfully
        self.uploads: dict[str, bytes] = {}
        self.files: dict[tuple, bytes] = {}
        self.history: dict[str, dict] = {}
        self.interrupts: list = []
        self.deleted: list = []
        self.history_deleted: list = []
        self.flags: dict[str, dict] = {}  # client id → the feature flags it announced
        self._reset_state()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle (called from the test's thread) ------------------------------------------------

    def start(self) -> FakeComfy:
        ready = threading.Event()

        def main() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._start())
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self._stop())
            self.loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name=f"fake-comfy-{self.port}")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake ComfyUI did not start within 10 s")
        return self

    def stop(self) -> None:
        if self.loop and self._thread and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def kill(self) -> None:
        """Die like a killed process: sockets closed, queue and history gone."""
        self.stop()
        self._reset_state()

    def revive(self) -> None:
        self.start()

    def hang(self) -> None:
        """Keep the port open but answer nothing: HTTP calls and WebSockets go silent."""
        self.call(self._hang)

    def call(self, fn, *args):
        """Run ``fn(*args)`` in the server's loop and wait for it."""
        async def runner():
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(10)

    def __enter__(self) -> FakeComfy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inside the loop --------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.history = {}
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.queue_items: list[_Queued] = []
        self.running: _Queued | None = None
        self.number = 0
        self.hung = False
        self._interrupt = False
        self._dropped = 0

    async def _start(self) -> None:
        self._reset_state()
        self._wake = asyncio.Event()
        self._never = asyncio.Event()
        app = web.Application(client_max_size=200 * 1024 * 1024, middlewares=[self._hang_middleware])
        r = app.router
        r.add_get("/ws", self._ws)
        r.add_get("/system_stats", self._system_stats)
        r.add_get("/object_info", self._object_info)
        r.add_get("/object_info/{cls}", self._object_info_one)
        r.add_post("/prompt", self._post_prompt)
        r.add_get("/queue", self._get_queue)
        r.add_post("/queue", self._post_queue)
        r.add_get("/history/{pid}", self._history)
        r.add_post("/history", self._post_history)
        r.add_post("/upload/image", self._upload)
        r.add_get("/view", self._view)
        r.add_post("/interrupt", self._post_interrupt)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self._worker = asyncio.create_task(self._work())

    async def _stop(self) -> None:
        self._worker.cancel()
        for ws in list(self.sockets.values()):
            transport = ws._req.transport if ws._req else None
            if transport:
                transport.abort()
        await self._runner.cleanup()

    def _hang(self) -> None:
        self.hung = True

    @web.middleware
    async def _hang_middleware(self, request, handler):
        if self.hung:
            await self._never.wait()
        return await handler(request)

    async def _send(self, client_id: str | None, kind: str, data: dict | bytes) -> None:
        if self.hung:
            return
        targets = [client_id] if client_id else list(self.sockets)
        for sid in targets:
            ws = self.sockets.get(sid)
            if ws is None or ws.closed:
                continue
            try:
                if isinstance(data, bytes):
                    await ws.send_bytes(data)
                else:
                    await ws.send_str(json.dumps({"type": kind, "data": data}))
            except (ConnectionError, RuntimeError):
                continue
            ws.sent = getattr(ws, "sent", 0) + 1
            limit = self.faults.drop_ws_after
            if limit is not None and ws.sent >= limit and self._dropped < self.faults.drop_ws_times:
                self._dropped += 1
                await ws.close()

    # -- HTTP handlers ------------------------------------------------------------------------------

    async def _ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        self.sockets[sid] = ws
        await ws.send_str(json.dumps({"type": "status", "data": {"status": self._queue_info(), "sid": sid}}))
        first = True
        async for message in ws:
            if message.type == WSMsgType.ERROR:
                break
            if first and message.type == WSMsgType.TEXT:  # ComfyUI reads feature flags from the first message only
                with contextlib.suppress(json.JSONDecodeError, AttributeError):
                    body = json.loads(message.data)
                    if body.get("type") == "feature_flags" and isinstance(body.get("data"), dict):
                        self.flags[sid] = body["data"]
            first = False
        if self.sockets.get(sid) is ws:
            self.sockets.pop(sid, None)
        return ws

    def _queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": len(self.queue_items) + (1 if self.running else 0)}}

    async def _system_stats(self, request):
        return web.json_response({"system": {"comfyui_version": "0.3.64-fake", "os": "posix"}, "devices": []})

    async def _object_info(self, request):
        return web.json_response(self.object_info)

    async def _object_info_one(self, request):
        cls = request.match_info["cls"]
        return web.json_response({cls: self.object_info[cls]} if cls in self.object_info else {})

    async def _post_prompt(self, request):
        body = await request.json()
        if self.faults.reject_with is not None:
            return web.json_response(self.faults.reject_with, status=400)
        if "prompt" not in body:
            return web.json_response({"error": {"type": "no_prompt", "message": "No prompt provided",
                                                "details": "No prompt provided", "extra_info": {}},
                                      "node_errors": {}}, status=400)
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        error, node_errors, outputs = self._validate(prompt)
        if error:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        self.number += 1
        self.received.append(prompt_id)
        self.prompts[prompt_id] = prompt
        self.queue_items.append(_Queued(self.number, prompt_id, prompt, body.get("client_id"), outputs))
        self._wake.set()
        return web.json_response({"prompt_id": prompt_id, "number": self.number, "node_errors": {}})

    def _validate(self, prompt: dict):
        """The subset of ``execution.validate_prompt`` the tests rely on, with ComfyUI's shapes."""
        for node_id, node in prompt.items():
            if node.get("class_type") not in self.object_info:
                return ({"type": "invalid_prompt", "message": f"Cannot execute because node {node.get('class_type')} "
                         "does not exist.", "details": f"Node ID '#{node_id}'", "extra_info": {}}, {}, [])
        outputs = [i for i, n in prompt.items() if self.object_info[n["class_type"]].get("output_node")]
        if not outputs:
            return ({"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                     "extra_info": {}}, {}, [])
        node_errors = {}
        for node_id, node in prompt.items():
            spec = self.object_info[node["class_type"]]["input"].get("required", {})
            errors = []
            for name, raw in spec.items():
                if name not in node.get("inputs", {}):
                    errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                   "details": name, "extra_info": {"input_name": name}})
                elif isinstance(raw[0], list) and not isinstance(node["inputs"][name], list):
                    value = node["inputs"][name]
                    if value not in raw[0] and not (raw[1].get("image_upload") and value in self.uploads):
                        errors.append({"type": "value_not_in_list", "message": "Value not in list",
                                       "details": f"{name}: '{value}' not in {raw[0][:20]}",
                                       "extra_info": {"input_name": name, "received_value": value}})
            if errors:
                node_errors[node_id] = {"errors": errors, "dependent_outputs": outputs, "class_type": node["class_type"]}
        if node_errors:
            return ({"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                     "details": "", "extra_info": {}}, node_errors, [])
        return None, {}, outputs

    async def _get_queue(self, request):
        def row(q: _Queued):
            return [q.number, q.prompt_id, q.prompt, {"client_id": q.client_id}, q.outputs]
        return web.json_response({"queue_running": [row(self.running)] if self.running else [],
                                  "queue_pending": [row(q) for q in self.queue_items]})

    async def _post_queue(self, request):
        body = await request.json()
        for prompt_id in body.get("delete", []):
            self.deleted.append(prompt_id)
            self.queue_items = [q for q in self.queue_items if q.prompt_id != prompt_id]
        if body.get("clear"):
            self.queue_items = []
        return web.Response(status=200)

    async def _post_interrupt(self, request):
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        target = body.get("prompt_id")
        self.interrupts.append(target)
        if self.running and (target is None or target == self.running.prompt_id):
            self._interrupt = True
        return web.Response(status=200)

    async def _history(self, request):
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def _post_history(self, request):
        body = await request.json()
        for prompt_id in body.get("delete", []):
            self.history_deleted.append(prompt_id)
            self.history.pop(prompt_id, None)
        if body.get("clear"):
            self.history.clear()
        return web.Response(status=200)

    async def _upload(self, request):
        post = await request.post()
        image = post.get("image")
        if image is None or not getattr(image, "filename", None):
            return web.Response(status=400)
        data = image.file.read()
        name = image.filename
        stem, dot, ext = name.rpartition(".")
        counter = 1
        while name in self.uploads and self.uploads[name] != data and post.get("overwrite") not in ("true", "1"):
            name = f"{stem} ({counter}).{ext}"
            counter += 1
        self.uploads[name] = data
        return web.json_response({"name": name, "subfolder": post.get("subfolder", ""), "type": "input"})

    async def _view(self, request):
        key = (request.query.get("type", "output"), request.query.get("subfolder", ""), request.query.get("filename"))
        if key not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[key], content_type="image/png")

    # -- the worker --------------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            while not self.queue_items or self.hung:
                self._wake.clear()
                await self._wake.wait() if not self.hung else await self._never.wait()
            item = self.queue_items.pop(0)
            self.running = item
            try:
                await self._execute(item)
            finally:
                self.running = None

    def _order(self, prompt: dict, outputs: list[str]) -> list[str]:
        order, seen = [], set()

        def visit(node_id: str) -> None:
            if node_id in seen:
                return
            seen.add(node_id)
            for value in prompt[node_id].get("inputs", {}).values():
                if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                    visit(str(value[0]))
            order.append(node_id)

        for node_id in outputs:
            visit(node_id)
        return order

    def _source_picture(self, prompt: dict, node_id: str, seen=None) -> bytes | None:
        seen = seen or set()
        if node_id in seen:
            return None
        seen.add(node_id)
        node = prompt[node_id]
        if node["class_type"] == "LoadImage":
            return self.uploads.get(node["inputs"].get("image"))
        if node["class_type"] == "EditKitLoadImageBase64":
            text = str(node["inputs"].get("data", ""))
            return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text)
        for value in node.get("inputs", {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                found = self._source_picture(prompt, str(value[0]), seen)
                if found is not None:
                    return found
        return None

    def _batch_size(self, prompt: dict, node_id: str, seen=None) -> int:
        """The ``batch_size`` of the nearest upstream sampler (a node with ``steps`` too; BEN2's ``batch_size`` is
        how many pictures it processes at once, not how many it makes), 1 when none."""
        seen = seen or set()
        if node_id in seen:
            return 1
        seen.add(node_id)
        inputs = prompt[node_id].get("inputs", {})
        if isinstance(inputs.get("batch_size"), int) and "steps" in inputs:
            return inputs["batch_size"]
        for value in inputs.values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                size = self._batch_size(prompt, str(value[0]), seen)
                if size != 1:
                    return size
        return 1

    async def _send_picture(self, client_id: str | None, prompt_id: str, node_id: str, png: bytes) -> None:
        """A picture frame as ComfyUI's server sends it (event 4 with metadata, or event 1 bare)."""
        flags = self.flags.get(client_id or "", {})
        if flags.get("supports_preview_metadata") and not self.faults.ignore_feature_flags:
            meta = json.dumps({"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
                               "parent_node_id": None, "real_node_id": node_id, "image_type": "image/png"}).encode()
            frame = struct.pack(">I", 4) + struct.pack(">I", len(meta)) + meta + png
        else:
            frame = struct.pack(">I", 1) + struct.pack(">I", 2) + png
        await self._send(client_id, "binary", frame)

    async def _execute(self, item: _Queued) -> None:
        cid, pid, prompt = item.client_id, item.prompt_id, item.prompt
        messages = []

        async def message(kind: str, data: dict, keep: bool = True) -> None:
            data = {**data, "prompt_id": pid}
            if keep:
                messages.append([kind, {**data, "timestamp": int(time.time() * 1000)}])
            await self._send(cid, kind, data)

        await message("execution_start", {"timestamp": int(time.time() * 1000)})
        await message("execution_cached", {"nodes": [], "timestamp": int(time.time() * 1000)})
        outputs_ui: dict = {}
        executed: list[str] = []
        status = "success"
        for node_id in self._order(prompt, item.outputs):
            node = prompt[node_id]
            await message("executing", {"node": node_id, "display_node": node_id}, keep=False)
            steps = node["inputs"].get("steps") if isinstance(node["inputs"].get("steps"), int) else 0
            for step in range(1, min(steps, self.faults.steps) + 1):
                await message("progress", {"value": step, "max": steps, "node": node_id}, keep=False)
            if self.faults.node_seconds:
                await asyncio.sleep(self.faults.node_seconds)
            if self._interrupt:
                self._interrupt = False
                status = "interrupted"
                await message("execution_interrupted", {"node_id": node_id, "node_type": node["class_type"],
                                                        "executed": executed})
                break
            bad = [k for k, v in node["inputs"].items() if isinstance(v, str) and "FAIL" in v]
            if bad:
                status = "error"
                await message("execution_error", {
                    "node_id": node_id, "node_type": node["class_type"], "executed": executed,
                    "exception_message": f"fake failure requested by input '{bad[0]}'",
                    "exception_type": "RuntimeError",
                    "traceback": ["Traceback (most recent call last):\n", "  File \"fake.py\", line 1, in run\n",
                                  f"RuntimeError: fake failure requested by input '{bad[0]}'\n"],
                    "current_inputs": {k: [str(v)] for k, v in node["inputs"].items()}, "current_outputs": executed})
                break
            if self.object_info[node["class_type"]].get("output_node"):
                source = self._source_picture(prompt, node_id)
                picture = Image.new("RGB", (16, 16), (10, 20, 30))
                if source is not None:
                    with Image.open(io.BytesIO(source)) as opened:
                        picture = ImageOps.invert(opened.convert("RGB"))
                buffer = io.BytesIO()
                picture.save(buffer, format="PNG")
                count = self._batch_size(prompt, node_id)
                if node["class_type"] == "SaveImageWebsocket":
                    if self.faults.frames_lag:
                        self.history[pid] = {"prompt": [item.number, pid, prompt, {"client_id": cid}, item.outputs],
                                             "outputs": {}, "meta": {},
                                             "status": {"status_str": "success", "completed": True, "messages": []}}
                        await asyncio.sleep(self.faults.frames_lag)
                    for index in range(count):
                        await self._send_picture(cid, pid, node_id, buffer.getvalue())
                        await message("progress", {"value": index + 1, "max": count, "node": node_id}, keep=False)
                    executed.append(node_id)
                    continue
                kind = "output" if node["class_type"] == "SaveImage" else "temp"
                prefix = str(node["inputs"].get("filename_prefix", "ComfyUI_temp"))
                subfolder, _, stem = prefix.rpartition("/")
                refs = []
                for _ in range(count):
                    name = f"{stem}_{len(self.files) + 1:05d}_.png"
                    self.files[(kind, subfolder, name)] = buffer.getvalue()
                    refs.append({"filename": name, "subfolder": subfolder, "type": kind})
                ui = {"images": refs}
                outputs_ui[node_id] = ui
                await message("executed", {"node": node_id, "display_node": node_id, "output": ui}, keep=False)
            executed.append(node_id)
        if status == "success":
            await message("execution_success", {"timestamp": int(time.time() * 1000)})
            self.executed.append(pid)
        if not self.faults.lose_history:
            self.history[pid] = {
                "prompt": [item.number, pid, prompt, {"client_id": cid}, item.outputs],
                "outputs": outputs_ui if status == "success" else {},
                "status": {"status_str": "success" if status == "success" else "error",
                           "completed": status == "success", "messages": messages},
                "meta": {}}
        await self._send(cid, "status", {"status": self._queue_info()})
        await self._send(cid, "executing", {"node": None, "prompt_id": pid})
