"""``python -m client batch``: one workflow over many pictures or prompts, spread over servers.

Scheduling: every server gets ``--in-flight`` slots (2 by default: one running, one queued behind
it, so the server never idles between prompts while keeping little work at risk when it dies). A
slot takes the next ready item from one shared queue, so faster servers take more items.

Faults: a server that stops answering, hangs (no WebSocket message for the stall timeout) or
forgets a prompt is marked down, its items go back to the front of the queue for the other
servers, and a prober brings it back when ``/system_stats`` answers again. An item whose prompt
fails (refused, execution error) is retried with exponential backoff; when it has failed the same
way ``--max-failures`` times it is recorded as failed and the batch goes on. Errors that retrying
cannot fix (not a picture, a ``--set`` that does not fit) fail the item at once.

Resume: the manifest (JSONL) gets one line per item that ended. Items whose last record is
``done`` for the same workflow and settings (the ``config`` hash) are skipped by the next run;
failed items are tried again.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from .files import clear_partials, list_pictures, read_picture, safe_stem
from .manifest import Manifest
from .run import download_outputs
from .validate import validate
from .workflow import (
    apply_overrides,
    find_node,
    image_node,
    is_link,
    load_workflow,
    parse_assignment,
    split_target,
)

JSONL_FIELDS = {"id", "prompt", "set", "image"}


@dataclass
class Item:
    """One unit of work: a picture or a prompt line, with its own overrides."""

    key: str
    input: str
    picture: Path | None = None
    prompt_text: str | None = None
    sets: dict = field(default_factory=dict)
    subdir: Path = Path()
    stem: str = "item"
    attempts: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    not_before: float = 0.0
    first_queued: float = 0.0


@dataclass
class ServerState:
    server: ComfyServer
    healthy: asyncio.Event = field(default_factory=asyncio.Event)
    excluded: str | None = None
    checked: bool = False
    probed: bool = False
    done: int = 0
    failed: int = 0
    lost: int = 0
    busy_s: float = 0.0
    downs: int = 0


# -- items ---------------------------------------------------------------------------------------


def picture_items(folders: list[Path]) -> list[Item]:
    """Every picture under the folders (recursively); keys are stable across runs."""
    pairs = list_pictures(folders)
    several = len({str(Path(root).resolve()) for root, _ in pairs}) > 1
    items = []
    for root, path in pairs:
        rel = path.relative_to(root)
        key = f"{Path(root).resolve().as_posix()}::{rel.as_posix()}"
        subdir = rel.parent
        if several:
            subdir = Path(safe_stem(Path(root).resolve().name) or "input") / subdir
        items.append(Item(key=key, input=str(path), picture=path, subdir=subdir, stem=safe_stem(path.stem) or "picture"))
    return items


def prompt_items(path: Path) -> list[Item]:
    """Items of a prompts file: text (one prompt a line, ``#`` comments) or JSONL objects with
    ``prompt``, ``set`` ({"NODE.INPUT": value}), ``image`` (path, relative to the file) and ``id``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"cannot read prompts file '{path}': {exc}") from exc
    items: list[Item] = []
    seen: collections.Counter = collections.Counter()
    jsonl = Path(path).suffix.lower() in (".jsonl", ".ndjson")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (not jsonl and line.lstrip().startswith("#")):
            continue
        if jsonl:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkflowError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
            if not isinstance(entry, dict):
                raise WorkflowError(f"{path}:{number}: expected a JSON object, got {type(entry).__name__}")
            unknown = sorted(set(entry) - JSONL_FIELDS)
            if unknown:
                raise WorkflowError(f"{path}:{number}: unknown field '{unknown[0]}' (allowed: "
                                    f"{', '.join(sorted(JSONL_FIELDS))})")
            sets = entry.get("set") or {}
            if not isinstance(sets, dict):
                raise WorkflowError(f"{path}:{number}: 'set' must be an object of \"NODE.INPUT\": value")
            for target in sets:
                split_target(target)
            picture = None
            if entry.get("image"):
                picture = (Path(path).parent / str(entry["image"])).expanduser()
            prompt_text = entry.get("prompt")
            if prompt_text is not None and not isinstance(prompt_text, str):
                raise WorkflowError(f"{path}:{number}: 'prompt' must be text")
            identity = str(entry["id"]) if "id" in entry else json.dumps(entry, sort_keys=True, ensure_ascii=False)
        else:
            prompt_text, sets, picture, identity = line.strip(), {}, None, line.strip()
        digest = hashlib.sha1(identity.encode("utf-8")).hexdigest()[:16]
        seen[digest] += 1
        key = f"prompt:{digest}" + (f"#{seen[digest]}" if seen[digest] > 1 else "")
        label = prompt_text if prompt_text is not None else (str(picture) if picture else identity)
        items.append(Item(key=key, input=label, picture=picture, prompt_text=prompt_text, sets=sets,
                          stem=f"item{len(items) + 1:05d}"))
    if not items:
        raise WorkflowError(f"prompts file '{path}' holds no prompts")
    return items


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


def _signature(exc: Exception) -> str:
    """What "failing the same way" means: the message without ids, URLs and numbers that vary."""
    text = str(exc)
    text = re.sub(r"https?://\S+", "<server>", text)
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", text)
    text = re.sub(r"\d+(\.\d+)? s\b", "<n> s", text)
    return f"{type(exc).__name__}: {text}"


# -- the runner ----------------------------------------------------------------------------------


class BatchRunner:
    """Runs items over servers; see the module docstring for the rules."""

    def __init__(self, *, workflow_name: str, workflow: dict, items: list[Item], urls: list[str], out_dir: Path,
                 manifest_path: Path | None = None, global_sets: list | None = None, image_ref: str | None = None,
                 prompt_ref: str | None = None, in_flight: int = 2, max_failures: int = 3, retry_base: float = 1.0,
                 give_up_after: float = 600.0, probe_interval: float = 2.0, timeouts: Timeouts | None = None,
                 emit=None, progress: bool = True):
        self.workflow_name = workflow_name
        self.items_all = items
        self.out_dir = Path(out_dir)
        self.manifest = Manifest(manifest_path or self.out_dir / "manifest.jsonl")
        self.global_sets = global_sets or []
        self.in_flight = max(1, in_flight)
        self.max_failures = max(1, max_failures)
        self.retry_base = retry_base
        self.give_up_after = give_up_after
        self.probe_interval = probe_interval
        self.timeouts = timeouts or Timeouts()
        self.emit = emit or (lambda event: None)
        self.progress = progress
        self.base = workflow
        self.image_node = image_node(workflow, image_ref) if any(i.picture for i in items) else None
        self.prompt_node = prompt_target(workflow, prompt_ref) if any(i.prompt_text is not None for i in items) else None
        for node_ref, _, _ in self.global_sets:
            if node_ref != "*":
                find_node(workflow, node_ref)
        self.config = hashlib.sha256(json.dumps(
            [workflow, [list(s) for s in self.global_sets], self.image_node, self.prompt_node],
            sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
        self.servers = [ServerState(ComfyServer(u, self.timeouts)) for u in dict.fromkeys(urls)]
        self.pending: collections.deque[Item] = collections.deque()
        self.running = 0
        self.cond = asyncio.Condition()
        self.finished = asyncio.Event()
        self.stop_reason: str | None = None
        self.counts = collections.Counter()
        self.bar = None

    # -- scheduling -----------------------------------------------------------------------------

    async def _next_item(self) -> Item | None:
        async with self.cond:
            while True:
                if self.stop_reason:
                    return None
                now = time.monotonic()
                for item in self.pending:
                    if item.not_before <= now:
                        self.pending.remove(item)
                        self.running += 1
                        return item
                if not self.pending and self.running == 0:
                    self.finished.set()
                    self.cond.notify_all()
                    return None
                wait = min((i.not_before - now for i in self.pending), default=None)
                try:
                    await asyncio.wait_for(self.cond.wait(), max(wait, 0.01) if wait is not None else None)
                except asyncio.TimeoutError:
                    pass

    async def _release(self, item: Item, requeue: bool, front: bool = False) -> None:
        async with self.cond:
            self.running -= 1
            if requeue:
                (self.pending.appendleft if front else self.pending.append)(item)
            self.cond.notify_all()

    # -- servers --------------------------------------------------------------------------------

    async def _probe(self, state: ServerState) -> None:
        """Bring a server back when it answers again (bounded backoff), then check it can run the workflow."""
        delay = self.probe_interval
        while not self.finished.is_set() and not self.stop_reason and state.excluded is None:
            if not state.healthy.is_set():
                try:
                    await state.server.system_stats(timeout=self.timeouts.connect + 2)
                    if not state.checked:
                        await self._check_server(state)
                    if state.excluded is None:
                        state.healthy.set()
                        delay = self.probe_interval
                        self.emit({"event": "server_up", "server": state.server.url})
                        self._note(f"ComfyUI at {state.server.url} answers; it takes items")
                except ServerUnavailable:
                    delay = min(delay * 2, 30.0)
                except ClientError as exc:
                    state.excluded = str(exc)
                    self._note(f"not using ComfyUI at {state.server.url}: {exc}")
                    state.probed = True
                    break
                if not state.probed and not state.healthy.is_set():
                    self._note(f"ComfyUI at {state.server.url} does not answer; going on with the other servers "
                               "and retrying it")
                state.probed = True
            await _wait_any([self.finished.wait()], delay if not state.healthy.is_set() else 0.5)

    async def _check_server(self, state: ServerState) -> None:
        """Can this server run the workflow at all (node classes, model files)? If not, drop it."""
        info = await state.server.object_info(refresh=True)
        probe = apply_overrides(self.base, self.global_sets, info)
        uploaded_per_item = set()  # the workflow's own picture name: each item uploads its picture instead
        if self.image_node:
            uploaded_per_item.add(probe[self.image_node]["inputs"]["image"])
        try:
            validate(probe, info, state.server.url, known_images=uploaded_per_item)
        except ValidationFailed as exc:
            state.excluded = str(exc)
            self.emit({"event": "server_excluded", "server": state.server.url, "error": str(exc)})
            self._note(f"not using ComfyUI at {state.server.url}: {exc}")
        state.checked = True

    def _server_down(self, state: ServerState, exc: Exception) -> None:
        if state.healthy.is_set():
            state.healthy.clear()
            state.downs += 1
            self.emit({"event": "server_down", "server": state.server.url, "error": str(exc)})
            self._note(f"ComfyUI at {state.server.url} is down ({exc}); its items go to the other servers")

    # -- items ----------------------------------------------------------------------------------

    async def _slot(self, state: ServerState) -> None:
        while True:
            while not state.healthy.is_set():
                if self.finished.is_set() or self.stop_reason or state.excluded:
                    return
                await _wait_any([state.healthy.wait(), self.finished.wait()], None)
            item = await self._next_item()
            if item is None:
                return
            if not state.healthy.is_set():
                await self._release(item, requeue=True, front=True)
                continue
            await self._run_item(state, item)

    def _item_prompt(self, item: Item, info: dict) -> dict:
        prompt = apply_overrides(self.base, self.global_sets, info)
        if item.prompt_text is not None:
            node_id, name = self.prompt_node
            prompt[node_id]["inputs"][name] = item.prompt_text
        if item.sets:
            prompt = apply_overrides(prompt, [(*split_target(t), v) for t, v in item.sets.items()], info)
        return prompt

    async def _run_item(self, state: ServerState, item: Item) -> None:
        server = state.server
        item.attempts += 1
        started = time.time()
        tick = time.monotonic()
        try:
            info = await server.object_info()
            prompt = self._item_prompt(item, info)
            if item.picture is not None:
                data = read_picture(item.picture)
                target = self.image_node or image_node(prompt, None)
                prompt[target]["inputs"]["image"] = await server.upload_image(data, item.picture.name)
            validate(prompt, info, server.url, server.uploaded)
            prompt_id = await server.submit(prompt)
            result = await server.wait(prompt_id, prompt, queued_at=started)
            files = await download_outputs(server, result, self.out_dir, item.stem, item.subdir)
        except ServerUnavailable as exc:
            state.lost += 1
            state.busy_s += time.monotonic() - tick
            self._server_down(state, exc)
            await self._retry_or_fail(state, item, exc, limit=2 * self.max_failures, delay=0.0, front=True)
            return
        except (WorkflowError, ValidationFailed) as exc:
            state.busy_s += time.monotonic() - tick
            await self._fail(state, item, exc)
            return
        except (PromptRejected, ExecutionFailed, ExecutionInterrupted, ClientError) as exc:
            state.busy_s += time.monotonic() - tick
            delay = self.retry_base * 2 ** (item.failures[_signature(exc)])
            await self._retry_or_fail(state, item, exc, limit=self.max_failures, delay=delay, front=False)
            return
        state.busy_s += time.monotonic() - tick
        state.done += 1
        record = self._record(item, "done", server.url, result.prompt_id, files, None, started, result)
        self.manifest.append(record)
        self.counts["done"] += 1
        self.emit({"event": "item_done", "item": item.key, "input": item.input, "server": server.url,
                   "prompt_id": result.prompt_id, "outputs": record["outputs"]})
        self._advance()
        await self._release(item, requeue=False)

    async def _retry_or_fail(self, state: ServerState, item: Item, exc: Exception, limit: int, delay: float,
                             front: bool) -> None:
        signature = _signature(exc)
        item.failures[signature] += 1
        if item.failures[signature] >= limit:
            await self._fail(state, item, exc)
            return
        item.not_before = time.monotonic() + delay
        self.emit({"event": "item_retry", "item": item.key, "server": state.server.url, "error": str(exc),
                   "retry_in_s": round(delay, 3), "attempt": item.attempts})
        await self._release(item, requeue=True, front=front)

    async def _fail(self, state: ServerState, item: Item, exc: Exception) -> None:
        state.failed += 1
        self.manifest.append(self._record(item, "failed", state.server.url, None, [], str(exc), None, None))
        self.counts["failed"] += 1
        self.emit({"event": "item_failed", "item": item.key, "input": item.input, "server": state.server.url,
                   "error": str(exc)})
        self._note(f"failed: {item.input}: {exc}")
        self._advance()
        await self._release(item, requeue=False)

    def _record(self, item: Item, status: str, server: str, prompt_id, files, error, started, result) -> dict:
        now = time.time()
        timings = {"finished_at": round(now, 3), "attempts": item.attempts}
        if result is not None:
            timings.update(queued_at=round(result.queued_at, 3),
                           started_at=round(result.started_at, 3) if result.started_at else None,
                           wait_s=round((result.started_at or result.queued_at) - result.queued_at, 3),
                           run_s=round(result.finished_at - (result.started_at or result.queued_at), 3),
                           total_s=round(now - started, 3))
        return {"item": item.key, "input": item.input, "overrides": item.sets or {},
                "prompt": item.prompt_text, "workflow": self.workflow_name, "config": self.config,
                "server": server, "prompt_id": prompt_id,
                "outputs": [p.relative_to(self.out_dir).as_posix() for p in files], "status": status,
                "error": error, "attempts": item.attempts, "timings": timings}

    # -- progress and notes ---------------------------------------------------------------------

    def _note(self, text: str) -> None:
        if not self.progress:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            console.err(text)

    def _advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(" ".join(f"{s.server.url.split('//')[-1]}:{s.done}" for s in self.servers))

    async def _watchdog(self) -> None:
        """Stop when no server has been usable for ``give_up_after`` seconds."""
        down_since = None
        while not self.finished.is_set():
            usable = [s for s in self.servers if s.excluded is None]
            if not usable:
                self.stop_reason = "every server was dropped: " + "; ".join(s.excluded for s in self.servers)
            elif any(s.healthy.is_set() for s in usable):
                down_since = None
            else:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.give_up_after:
                    self.stop_reason = f"no ComfyUI server answered for {self.give_up_after:g} s"
            if self.stop_reason:
                async with self.cond:
                    self.cond.notify_all()
                self.finished.set()
                return
            await _wait_any([self.finished.wait()], 0.5)

    # -- entry point ----------------------------------------------------------------------------

    async def run(self) -> dict:
        started = time.monotonic()
        clear_partials(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        previous = self.manifest.load()
        todo, skipped, other_config = [], 0, 0
        for item in self.items_all:
            record = previous.get(item.key)
            if record and record.get("status") == "done":
                if record.get("config") == self.config:
                    skipped += 1
                    continue
                other_config += 1
            todo.append(item)
        if other_config:
            self._note(f"{other_config} item(s) were done with another workflow or other settings; redoing them")
        self.counts["skipped"] = skipped
        self.pending.extend(todo)
        if self.progress and todo:
            from tqdm import tqdm

            self.bar = tqdm(total=len(todo), unit="item", file=sys.stderr, dynamic_ncols=True)
        probes = [asyncio.create_task(self._probe(s)) for s in self.servers]
        try:
            if todo:
                await _wait_any([asyncio.gather(*(asyncio.shield(self._first_up(s)) for s in self.servers))], None)
                if not any(s.healthy.is_set() for s in self.servers):
                    reasons = "; ".join(s.excluded or f"{s.server.url} does not answer" for s in self.servers)
                    raise ServerUnavailable(f"no ComfyUI server can run the batch: {reasons}")
                slots = [asyncio.create_task(self._slot(s)) for s in self.servers for _ in range(self.in_flight)]
                watchdog = asyncio.create_task(self._watchdog())
                await asyncio.gather(*slots)
                self.finished.set()
                await watchdog
            else:
                self.finished.set()
        finally:
            self.finished.set()
            for task in probes:
                task.cancel()
            await asyncio.gather(*probes, return_exceptions=True)
            for state in self.servers:
                await state.server.close()
            if self.bar is not None:
                self.bar.close()
        return self._summary(time.monotonic() - started, len(todo))

    async def _first_up(self, state: ServerState) -> None:
        """Wait for the first probe of a server (it answered or not) so the start is not a race."""
        deadline = time.monotonic() + self.timeouts.connect + 10
        while time.monotonic() < deadline and not state.probed:
            await asyncio.sleep(0.02)

    def _summary(self, wall: float, todo: int) -> dict:
        left = todo - self.counts["done"] - self.counts["failed"]
        servers = []
        for state in self.servers:
            servers.append({"server": state.server.url, "done": state.done, "failed": state.failed,
                            "requeued": state.lost, "went_down": state.downs, "excluded": state.excluded,
                            "busy_s": round(state.busy_s, 3),
                            "items_per_min": round(60.0 * state.done / wall, 2) if wall > 0 else None})
        return {"event": "summary", "workflow": self.workflow_name, "done": self.counts["done"],
                "failed": self.counts["failed"], "skipped": self.counts["skipped"], "left": max(left, 0),
                "wall_s": round(wall, 3), "stopped": self.stop_reason, "servers": servers,
                "manifest": str(self.manifest.path)}


async def _wait_any(awaitables: list, timeout: float | None) -> None:
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


def format_summary(summary: dict) -> str:
    lines = [f"batch {summary['workflow']}: {summary['done']} done, {summary['failed']} failed, "
             f"{summary['skipped']} skipped (done before), {summary['left']} left, in {summary['wall_s']:.1f} s"]
    for s in summary["servers"]:
        extra = f", excluded: {s['excluded'].splitlines()[0]}" if s["excluded"] else ""
        lines.append(f"  {s['server']}: {s['done']} done ({s['items_per_min']} items/min), {s['failed']} failed, "
                     f"{s['requeued']} requeued, down {s['went_down']}×{extra}")
    if summary["stopped"]:
        lines.append(f"stopped early: {summary['stopped']}")
    lines.append(f"manifest: {summary['manifest']}")
    return "\n".join(lines)


async def batch_command(args) -> int:
    """Body of ``python -m client batch``."""
    if bool(args.input) == bool(args.prompts):
        raise WorkflowError("give either --input FOLDER (repeatable) or --prompts FILE")
    workflow = load_workflow(args.workflow)
    items = picture_items([Path(p) for p in args.input]) if args.input else prompt_items(Path(args.prompts))
    sets: list[tuple[str, str, Any]] = [parse_assignment(s) for s in args.set or []]
    as_json = args.json

    def emit(event: dict) -> None:
        if as_json:
            console.event(event)

    runner = BatchRunner(
        workflow_name=Path(args.workflow).stem, workflow=workflow, items=items,
        urls=args.server or ["http://127.0.0.1:8188"], out_dir=Path(args.out),
        manifest_path=Path(args.manifest) if args.manifest else None, global_sets=sets,
        image_ref=args.image_node, prompt_ref=args.prompt_target, in_flight=args.in_flight,
        max_failures=args.max_failures, retry_base=args.retry_base, give_up_after=args.give_up_after,
        probe_interval=args.probe_interval, timeouts=Timeouts(stall=args.stall_timeout, request=args.request_timeout),
        emit=emit, progress=not as_json)
    summary = await runner.run()
    if as_json:
        emit(summary)
    else:
        console.err(format_summary(summary))
    return 0 if summary["failed"] == 0 and summary["left"] == 0 and not summary["stopped"] else 1
