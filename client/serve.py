"""``python -m client serve``: the HTTP API the seed applications call, forwarding to ComfyUI.

Endpoints: ``GET /api/image_editing/experiments``, ``POST /api/edit_with_comfyui``, ``POST /generate``
(JSON), ``POST /generate/upload`` (multipart), ``GET /api/progress/{request id}`` (server-sent events:
:mod:`client.progress`), ``GET /healthz`` (the process is up), ``GET /readyz`` (at least one ComfyUI
server answers and has EditKit's nodes), and the experiments page at ``/`` (plain HTML, CSS and JS in
``client/web/``, built from the experiments endpoint).

Every error is ``{"success": false, "error": "..."}`` with a 4xx (the request is wrong: the message
names the field and the fix; checked before anything is queued) or 5xx (ComfyUI is down, 503; a node
failed, 502; not configured, 501); tracebacks go to this process's log only. Bodies and pictures have
size limits; unknown fields are refused so a misspelt parameter is not silently ignored. Bound to
loopback by default; any other address needs an access token (``Authorization: Bearer <token>`` or
``X-Access-Token``), because the API makes a GPU server run work for whoever can reach it.

A request costs what it returns and stops when abandoned: ``/generate`` renders ``num_images``
pictures (default 1) and returns them all; a caller that disconnects or runs past ``comfyui.timeout``
gets its ComfyUI prompt taken off the queue or interrupted (that prompt only). Pictures sent and
produced leave no file in ComfyUI's folders unless ``--keep-files`` (:mod:`client.routing` says how).
``--cors-origin`` lets browser apps on other origins call the API.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from . import console
from .comfy import ComfyServer, Timeouts
from .errors import (
    ClientError,
    ExecutionFailed,
    ExecutionInterrupted,
    PromptRejected,
    ServerUnavailable,
    ValidationFailed,
    WorkflowError,
)
from .experiments import PICTURE_PARAMETERS, Experiments, Feature, Route
from .files import picture_info
from .progress import ID_PATTERN, Channel, ProgressHub, comfy_event
from .routing import WEBSOCKET_OUTPUT, BadValue, check_values, fill, without_files
from .validate import validate
from .workflow import add_preview

log = logging.getLogger("editkit.client.serve")
EDIT_NUMBERS = (("steps", int, 1, 10000), ("guidance_scale", float, 0, 1000), ("strength", float, 0, 1),
                ("seed", int, 0, 2**64 - 1), ("extend_left", int, 0, 16384), ("extend_top", int, 0, 16384),
                ("extend_right", int, 0, 16384), ("extend_bottom", int, 0, 16384))
EDIT_FIELDS = {"experiment_id", "feature_id", "input_image_base64", "extra_images_base64", "prompt", "negative_prompt",
               *(name for name, *_ in EDIT_NUMBERS)}
STRUCTURAL = ("extend_left", "extend_top", "extend_right", "extend_bottom")  # refused where the feature has none
WEB_DIR = Path(__file__).resolve().parent / "web"
GENERATE_FIELDS = {"mode", "input_image", "prompt", "height", "width", "num_inference_steps", "cfg", "seed", "model_id",
                   "num_images"}
GENERATE_DEFAULTS = {"prompt": "", "height": 1024, "width": 1024, "num_inference_steps": 50, "cfg": 2.5, "seed": 42,
                     "model_id": None, "num_images": 1}
OPEN_PATHS = {"/", "/healthz", "/readyz"}  # and /static/: the page itself; its API calls carry the token
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    keep_files: bool = False  # run workflows as written: uploads and saved pictures stay in ComfyUI's folders


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json_error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"success": False, "error": message, **extra}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except HttpError as exc:
        return _json_error(exc.status, exc.message)
    except web.HTTPRequestEntityTooLarge as exc:
        return _json_error(413, f"the request body is larger than the limit ({exc.text or 'see --max-body-mb'})")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_error(exc.status, exc.reason or "error")
    except Exception as exc:  # never a stack trace to the caller
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _json_error(500, f"internal error ({type(exc).__name__}); the server log has the details")


CORS_ORIGINS = web.AppKey("cors_origins", frozenset)


def _permitted(origins: frozenset, origin: str | None) -> bool:
    return bool(origin) and ("*" in origins or origin in origins)


@web.middleware
async def cors_middleware(request: web.Request, handler):
    """CORS for browser apps on other origins (``--cors-origin``, repeatable; ``*`` for any): the preflight
    answer here, the origin header on every other answer in :func:`cors_headers`.

    Written here rather than with aiohttp-cors: that package wants every route registered with it and
    would be a fifth dependency of a client that installs with four; what is needed is the preflight
    answer and one header on every answer, errors and event streams included.
    """
    origin = request.headers.get("Origin")
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if not _permitted(request.app[CORS_ORIGINS], origin):
            hint = f"start serve with --cors-origin {origin}" if origin else "send an Origin header"
            return _json_error(403, f"cross-origin requests from {origin or 'this page'} are not allowed: {hint}")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Access-Token, X-Request-Id",
            "Access-Control-Max-Age": "600"})
    return await handler(request)


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the origin header on every answer to an allowed origin, set before the headers
    go out, so streamed answers (server-sent events) get it too."""
    origin = request.headers.get("Origin")
    if _permitted(request.app[CORS_ORIGINS], origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"


def token_middleware(token: str | None):
    @web.middleware
    async def check(request: web.Request, handler):
        if token and request.path not in OPEN_PATHS and not request.path.startswith("/static/"):
            given = request.headers.get("X-Access-Token", "")
            auth = request.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise HttpError(401, "missing or wrong access token: send 'Authorization: Bearer <token>'")
        return await handler(request)
    return check


class ServerPool:
    """ComfyUI servers behind the API: the least busy one that answers takes each request."""

    def __init__(self, urls: list[str], timeouts: Timeouts):
        self.servers = [ComfyServer(u, timeouts) for u in dict.fromkeys(urls)]
        self.busy = {s.url: 0 for s in self.servers}
        self.down_until = {s.url: 0.0 for s in self.servers}

    def order(self) -> list[ComfyServer]:
        now = time.monotonic()
        return sorted(self.servers, key=lambda s: (self.down_until[s.url] > now, self.busy[s.url]))

    async def close(self) -> None:
        for server in self.servers:
            await server.close()


class Api:
    def __init__(self, experiments: Experiments, pool: ServerPool, limits: Limits):
        self.experiments = experiments
        self.pool = pool
        self.limits = limits
        self.warned: set[str] = set()
        self.progress = ProgressHub()

    # -- helpers --------------------------------------------------------------------------------

    async def _json_body(self, request: web.Request, form_endpoint: str | None = None) -> dict:
        if request.content_type in FORM_TYPES:
            other = (f", or post the form to {form_endpoint}" if form_endpoint else
                     " with the picture base64-encoded in its field")
            raise HttpError(400, f"{request.path} takes a JSON object (Content-Type: application/json), not a "
                                 f"{request.content_type} form: send JSON{other}")
        raw = await request.read()
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the body is not valid JSON ({exc}); send a JSON object with "
                                 "Content-Type: application/json") from exc
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        return body

    def _picture(self, value: Any, field_name: str) -> bytes:
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        else:
            if not isinstance(value, str) or not value.strip():
                raise HttpError(400, f"'{field_name}' must be a base64-encoded picture")
            text = value.strip()
            if text.startswith("data:") and "," in text:
                text = text.split(",", 1)[1]
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise HttpError(400, f"'{field_name}' is not valid base64 ({exc}); send the picture file's bytes "
                                     "base64-encoded (a data: URL is fine)") from exc
        try:
            picture_info(data, f"'{field_name}'", self.limits.max_pixels)
        except WorkflowError as exc:
            raise HttpError(400, str(exc)) from exc
        return data

    @staticmethod
    def _number(body: dict, name: str, kind: type, low=None, high=None):
        value = body[name]
        if isinstance(value, str) and value.strip():
            try:
                value = kind(float(value)) if kind is int and "." not in value else kind(value)
            except ValueError:
                raise HttpError(400, f"'{name}' must be a {'whole number' if kind is int else 'number'}, "
                                     f"got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and float(value) != int(value)):
            raise HttpError(400, f"'{name}' must be a {'whole number' if kind is int else 'number'}, got {value!r}")
        value = kind(value)
        if (low is not None and value < low) or (high is not None and value > high):
            raise HttpError(400, f"'{name}' must be between {low} and {high}, got {value}")
        return value

    async def _execute(self, route: Route, values: dict[str, Any], pictures: dict[str, bytes],
                       channel: Channel | None = None) -> dict[str, list[bytes]]:
        """Fill the route's workflow, run it on a live server, return its pictures per answer key.

        Cancelling this coroutine (the caller disconnected) cancels the ComfyUI prompt; so does the
        ``comfyui.timeout`` limit, which answers 504.
        """
        errors = []
        for server in self.pool.order():
            self.pool.busy[server.url] += 1
            try:
                return await asyncio.wait_for(self._execute_on(server, route, values, pictures, channel),
                                              self.experiments.timeout)
            except ServerUnavailable as exc:
                self.pool.down_until[server.url] = time.monotonic() + 5.0
                errors.append(str(exc))
            except asyncio.TimeoutError as exc:
                raise HttpError(504, f"ComfyUI at {server.url} did not finish within {self.experiments.timeout:g} s "
                                     "(comfyui.timeout in the experiments file); the prompt was cancelled") from exc
            finally:
                self.pool.busy[server.url] -= 1
        raise HttpError(503, "no ComfyUI server answers: " + " | ".join(errors))

    async def _execute_on(self, server: ComfyServer, route: Route, values: dict, pictures: dict[str, bytes],
                          channel: Channel | None = None) -> dict[str, list[bytes]]:
        info = await server.object_info()
        prompt = fill(route, values)
        try:
            check_values(route, values, prompt, info)
        except BadValue as exc:
            raise HttpError(400, str(exc)) from exc
        wanted = {"image": route.output_node}
        if route.background is not None:
            node_id, index, overrides = route.background
            wanted["background_removed"] = add_preview(prompt, node_id, index, overrides)
        targets = {(node_id, input_name): parameter for parameter in pictures
                   for node_id, input_name in route.targets.get(parameter, [])}
        websocket = False
        if self.limits.keep_files:
            for (node_id, input_name), parameter in targets.items():
                if prompt[node_id]["class_type"] == "LoadImage" or _is_upload_input(info, prompt[node_id], input_name):
                    value = await server.upload_image(pictures[parameter], f"{parameter}.png")
                else:
                    value = base64.b64encode(pictures[parameter]).decode("ascii")
                prompt[node_id]["inputs"][input_name] = value
        else:
            websocket = WEBSOCKET_OUTPUT in info
            if not websocket:
                self._warn_once(server.url, f"ComfyUI at {server.url} has no {WEBSOCKET_OUTPUT} node (ComfyUI's "
                                "custom_nodes/websocket_image_save.py): answers are read from PreviewImage files in "
                                "its temp folder, which ComfyUI empties when it starts")
            encoded = {key: base64.b64encode(pictures[parameter]).decode("ascii") for key, parameter in targets.items()}
            without_files(prompt, encoded, wanted, websocket, self.limits.max_pixels)
        try:
            validate(prompt, info, server.url, server.uploaded)
        except ValidationFailed as exc:
            blamed = sorted({b for b in (route.target_of(p.node_id, p.input) for p in exc.problems) if b})
            if blamed:
                raise HttpError(400, f"invalid value for {', '.join(blamed)}: {exc}") from exc
            raise HttpError(502, str(exc)) from exc
        prompt_id = str(uuid.uuid4())

        def on_event(event: dict) -> None:
            relayed = comfy_event(event, prompt)
            if relayed is not None and channel is not None:
                channel.publish(relayed)
        try:
            result = await server.run(prompt, on_event, check=False, prompt_id=prompt_id,
                                      binary_nodes=set(wanted.values()) if websocket else None)
            out: dict[str, list[bytes]] = {}
            for key, node_id in wanted.items():
                if websocket:
                    out[key] = list(result.ws_images.get(node_id, []))
                else:
                    out[key] = [await server.view(ref) for nid, ref in result.images() if nid == node_id]
        except (PromptRejected, ExecutionFailed, ExecutionInterrupted) as exc:
            raise HttpError(502, str(exc)) from exc
        finally:
            if not self.limits.keep_files:  # the history entry holds the request's picture as base64
                await asyncio.shield(self._forget(server, prompt_id))
        if not out.get("image"):
            why = (" (the WebSocket to ComfyUI dropped while the pictures were sent: try again)" if websocket else "")
            raise HttpError(502, f"the workflow '{route.workflow_name}' finished without a picture from node "
                                 f"{route.output_node}{why}")
        return out

    @staticmethod
    async def _forget(server: ComfyServer, prompt_id: str) -> None:
        with contextlib.suppress(ClientError, asyncio.TimeoutError):
            await asyncio.wait_for(server.delete_history(prompt_id), server.timeouts.connect + 5)

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s", text)
            console.err(f"note: {text}")

    # -- endpoints --------------------------------------------------------------------------------

    async def experiments_list(self, request: web.Request) -> web.Response:
        return web.json_response(self.experiments.public())

    async def edit(self, request: web.Request) -> web.Response:
        """``POST /api/edit_with_comfyui``; with ``X-Request-Id`` its progress is relayed (:mod:`client.progress`)."""
        request_id = request.headers.get("X-Request-Id")
        if request_id is not None and not ID_PATTERN.fullmatch(request_id):
            raise HttpError(400, "the X-Request-Id header must be 8 to 64 letters, digits, '-' or '_' (e.g. a UUID)")
        channel = self.progress.channel(request_id) if request_id else None
        if channel is not None:
            channel.publish({"stage": "accepted"})
        try:
            answer = await self._edit(request, channel)
        except HttpError as exc:
            if channel is not None:
                channel.publish({"stage": "error", "status": exc.status, "error": exc.message})
            raise
        except asyncio.CancelledError:
            if channel is not None:
                channel.publish({"stage": "error", "status": 499, "error": "the caller went away; the edit was cancelled"})
            raise
        if channel is not None:
            channel.publish({"stage": "done", "status": 200})
        return answer

    async def _edit(self, request: web.Request, channel: Channel | None) -> web.Response:
        started = time.monotonic()
        body = await self._json_body(request)
        _reject_unknown(body, EDIT_FIELDS)
        exp_id = body.get("experiment_id")
        if not isinstance(exp_id, str):
            raise HttpError(400, "'experiment_id' is required (text)")
        experiment = self.experiments.experiments.get(exp_id)
        if experiment is None:
            known = ", ".join(self.experiments.experiments) or "(none)"
            raise HttpError(404, f"unknown experiment_id '{exp_id}' (known: {known})")
        feature = _pick_feature(experiment.features, body.get("feature_id"), exp_id)
        targets = feature.route.targets
        if "input_image_base64" not in body:
            raise HttpError(400, "'input_image_base64' is required")
        pictures = {"input_image": self._picture(body["input_image_base64"], "input_image_base64")}
        extra = body.get("extra_images_base64")
        if extra is not None:
            takes = [p for p in PICTURE_PARAMETERS[1:] if p in targets]
            if not isinstance(extra, list):
                raise HttpError(400, "'extra_images_base64' must be a list of base64 pictures (pictures 2, 3, …)")
            if len(extra) > len(takes):
                raise HttpError(400, f"'extra_images_base64' has {len(extra)} picture(s) but feature '{feature.id}' "
                                     f"takes {len(takes)} besides the first; send at most {len(takes)}")
            for index, value in enumerate(extra):
                pictures[takes[index]] = self._picture(value, f"extra_images_base64[{index}]")
        values: dict[str, Any] = {}
        for name in ("prompt", "negative_prompt"):
            if body.get(name) is not None:
                if not isinstance(body[name], str):
                    raise HttpError(400, f"'{name}' must be text")
                values[name] = body[name]
        for name, kind, low, high in EDIT_NUMBERS:
            if body.get(name) is not None:
                if name in STRUCTURAL and name not in targets:
                    raise HttpError(400, f"'{name}' does not apply to feature '{feature.id}' (it extends the canvas "
                                         "in outpainting); leave it out")
                values[name] = self._number(body, name, kind, low, high)
        out = await self._execute(feature.route, values, pictures, channel)
        background = out.get("background_removed") or []
        return web.json_response({
            "success": True, "experiment_id": experiment.id, "experiment_name": experiment.name,
            "feature_id": feature.id,
            "output_image_base64": base64.b64encode(out["image"][0]).decode("ascii"),
            "background_removed_image_base64": base64.b64encode(background[0]).decode("ascii") if background else None,
            "elapsed_time": round(time.monotonic() - started, 3)})

    async def progress_stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/progress/{id}``: the request's events as server-sent events, until its last one."""
        request_id = request.match_info["request_id"]
        if not ID_PATTERN.fullmatch(request_id):
            raise HttpError(400, "a request id is 8 to 64 letters, digits, '-' or '_' (the X-Request-Id you sent)")
        channel = self.progress.channel(request_id)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the page went away; the request itself goes on
            async for event in channel.follow(idle_timeout=self.experiments.timeout + 60):
                await response.write(f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode())
            await response.write_eof()
        return response

    async def generate(self, request: web.Request) -> web.Response:
        return await self._generate(await self._json_body(request, form_endpoint="POST /generate/upload"))

    async def generate_upload(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            raise HttpError(400, "POST /generate/upload takes multipart/form-data (use POST /generate for JSON)")
        body: dict[str, Any] = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            name = part.name or ""
            if name in body:
                raise HttpError(400, f"the form field '{name}' is given twice")
            if part.filename is not None:
                body[name] = bytes(await part.read(decode=False))
            else:
                body[name] = await part.text()
        return await self._generate(body)

    async def _generate(self, body: dict) -> web.Response:
        _reject_unknown(body, GENERATE_FIELDS)
        mode = body.get("mode")
        if mode is None:
            raise HttpError(400, "'mode' is required (supported: " + ", ".join(self.experiments.generate or ["redux"]) + ")")
        if mode not in self.experiments.generate:
            supported = ", ".join(self.experiments.generate) or "(none configured)"
            raise HttpError(400 if mode != "redux" else 501, f"mode '{mode}' is not supported here (supported: "
                            f"{supported}); add a generate.{mode} entry to {self.experiments.source}")
        feature: Feature = self.experiments.generate[mode]
        if feature.disabled:
            raise HttpError(501, f"mode '{mode}' is not available: {feature.disabled}")
        if body.get("input_image") in (None, b"", ""):
            raise HttpError(400, "'input_image' is required (a base64 picture, or a file in /generate/upload)")
        merged = {**GENERATE_DEFAULTS, **{k: v for k, v in body.items() if v is not None}}
        model_id = merged.get("model_id")
        if model_id not in (None, "") and str(model_id) not in feature.model_ids:
            accepted = ", ".join(feature.model_ids) or "(none: leave model_id out)"
            raise HttpError(400, f"'model_id' {str(model_id)!r} is not served by mode '{mode}' here (accepted: "
                                 f"{accepted}); leave it out to use the configured model")
        if not isinstance(merged["prompt"], str):
            raise HttpError(400, "'prompt' must be text")
        route = feature.route
        values: dict[str, Any] = {}
        if merged["prompt"].strip():
            if feature.prompt_route is None:
                raise HttpError(400, f"'prompt' cannot be used: {feature.prompt_disabled}")
            route = feature.prompt_route
            values["prompt"] = merged["prompt"]
        picture = self._picture(body["input_image"], "input_image")
        for name, kind, low, high in (("height", int, 16, 8192), ("width", int, 16, 8192),
                                      ("num_inference_steps", int, 1, 10000), ("cfg", float, 0, 1000),
                                      ("seed", int, 0, 2**64 - 1), ("num_images", int, 1, 64)):
            values[name] = self._number(merged, name, kind, low, high)
        if "num_images" not in route.targets:
            if values["num_images"] != 1:
                raise HttpError(400, f"'num_images' must be 1 for mode '{mode}' here: its workflow "
                                     f"'{route.workflow_name}' renders one picture (map num_images in "
                                     f"{self.experiments.source} to change that)")
            del values["num_images"]
        out = await self._execute(route, values, {"input_image": picture})
        images = [base64.b64encode(data).decode("ascii") for data in out["image"]]
        return web.json_response({"success": True, "image_base64": images[0], "images_base64": images,
                                  "error": None})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        async def check(server: ComfyServer) -> dict:
            try:
                spec = await server.node_info("EditKitFluxLoader", timeout=5.0)
                return {"server": server.url, "answers": True, "editkit": spec is not None}
            except ClientError as exc:
                return {"server": server.url, "answers": False, "editkit": False, "error": str(exc)}

        servers = await asyncio.gather(*(check(s) for s in self.pool.servers))
        ready = any(s["answers"] and s["editkit"] for s in servers)
        return web.json_response({"ready": ready, "servers": servers}, status=200 if ready else 503)


def _is_upload_input(info: dict, node: dict, input_name: str) -> bool:
    spec = (info.get(node["class_type"]) or {}).get("input") or {}
    for section in ("required", "optional"):
        raw = (spec.get(section) or {}).get(input_name)
        if isinstance(raw, list) and len(raw) > 1 and isinstance(raw[1], dict) and raw[1].get("image_upload"):
            return True
    return False


def _reject_unknown(body: dict, allowed: set) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HttpError(400, f"unknown field '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def _pick_feature(features: list[Feature], feature_id, exp_id: str) -> Feature:
    if feature_id is None:
        enabled = [f for f in features if f.disabled is None]
        if not enabled:
            raise HttpError(501, f"experiment '{exp_id}' has no available feature")
        return enabled[0]
    for feature in features:
        if feature.id == feature_id:
            if feature.disabled:
                raise HttpError(501, f"feature '{feature_id}' is not available: {feature.disabled}")
            return feature
    raise HttpError(404, f"experiment '{exp_id}' has no feature '{feature_id}' (features: "
                         f"{', '.join(f.id for f in features)})")


async def page(request: web.Request) -> web.FileResponse:
    """The experiments page (``client/web/index.html``): static, no build step, only serve's own endpoints."""
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def build_app(experiments: Experiments, urls: list[str], token: str | None = None, limits: Limits | None = None,
              timeouts: Timeouts | None = None, cors_origins: list[str] | None = None) -> web.Application:
    limits = limits or Limits()
    pool = ServerPool(urls, timeouts or Timeouts())
    api = Api(experiments, pool, limits)
    # CORS outermost: error answers get its header too, and a preflight needs no token. Without origins
    # it still answers a preflight, with what to do.
    middlewares = [cors_middleware, error_middleware, token_middleware(token)]
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=middlewares)
    app[CORS_ORIGINS] = frozenset(cors_origins or [])
    app.router.add_get("/api/image_editing/experiments", api.experiments_list)
    app.router.add_post("/api/edit_with_comfyui", api.edit)
    app.router.add_post("/generate", api.generate)
    app.router.add_post("/generate/upload", api.generate_upload)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/api/progress/{request_id}", api.progress_stream)
    app.router.add_get("/", page)
    app.router.add_static("/static/", WEB_DIR)
    app.on_response_prepare.append(cors_headers)

    async def close_pool(app: web.Application) -> None:
        await pool.close()

    app.on_cleanup.append(close_pool)
    return app


async def serve_command(args) -> int:
    """Body of ``python -m client serve``: check everything, then serve until interrupted."""
    from .experiments import load_experiments

    token = args.token
    if not is_loopback(args.host) and not token:
        raise ClientError(f"serving on {args.host} makes the API reachable from other machines: pass --token TOKEN "
                          "(or set EDITKIT_SERVE_TOKEN); clients then send 'Authorization: Bearer TOKEN'")
    experiments = load_experiments(args.experiments)
    for feature in [f for e in experiments.experiments.values() for f in e.features] + list(experiments.generate.values()):
        if feature.disabled:
            log.warning("disabled: %s (%s)", feature.id, feature.disabled)
            console.err(f"note: '{feature.id}' is disabled: {feature.disabled}")
    urls = args.server or ([experiments.base_url] if experiments.base_url else ["http://127.0.0.1:8188"])
    app = build_app(experiments, urls, token,
                    Limits(int(args.max_body_mb * 1024 * 1024), args.max_pixels, keep_files=args.keep_files),
                    Timeouts(stall=args.stall_timeout), cors_origins=args.cors_origin)
    # handler_cancellation: a caller that disconnects cancels its handler, which cancels its ComfyUI prompt
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    console.out(f"serving on http://{args.host}:{args.port} (ComfyUI: {', '.join(urls)})")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return 0
