"""``python -m client batch``: one workflow over many pictures or prompts, spread over servers.

Scheduling: every worker (a ComfyUI server, see :mod:`client.workers`) gets ``--in-flight`` slots (2 by
default: one running, one queued behind it, so the server never idles between prompts while keeping
little work at risk when it dies). A slot takes the next ready item from one shared queue, so faster
servers take more items.

Faults: a server that stops answering, hangs (no WebSocket message for the stall timeout) or forgets a
prompt is marked down, its items go back to the front of the queue for the other servers, and a prober
brings it back (checked again for the workflow's nodes and models) when it answers. An item whose
prompt fails (refused, execution error) is retried with exponential backoff; when it has failed the
same way ``--max-failures`` times it is recorded as failed and the batch goes on. Errors that retrying
cannot fix (not a picture, a ``--set`` that does not fit) fail the item at once. When no server has
been usable for ``--give-up-after`` seconds (at the start too), the batch stops and says so.

Resume and exactly-once: the manifest (JSONL) gets one line per item that ended; items whose last record
is ``done`` for the same workflow and settings (the ``config`` hash) are skipped by the next run, failed
ones are tried again. Outputs are staged, recorded, then moved into place (:mod:`client.outputs`), so
after a kill at any moment every picture in the output tree is listed by the manifest, once.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import console
from .comfy import Timeouts
from .errors import (
    ClientError,
    ServerUnavailable,
    ValidationFailed,
    WorkflowError,
)
from .items import Item, picture_items, prompt_items
from .manifest import Manifest
from .outputs import OutputStore, output_name
from .workers import ComfyWorker, Job, Rendered, Worker
from .workflow import load_workflow, parse_assignment

__all__ = ["BatchRunner", "Item", "Job", "Worker", "batch_command", "picture_items", "prompt_items"]


@dataclass
class WorkerState:
    worker: Worker
    healthy: asyncio.Event
    excluded: str | None = None
    checked: bool = False
    probed: bool = False
    done: int = 0
    failed: int = 0
    lost: int = 0
    busy_s: float = 0.0
    downs: int = 0

    @property
    def name(self) -> str:
        return self.worker.name


def _signature(exc: Exception) -> str:
    """What "failing the same way" means: the message without ids, URLs and numbers that vary."""
    text = str(exc)
    text = re.sub(r"https?://\S+", "<server>", text)
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", text)
    text = re.sub(r"\d+(\.\d+)? s\b", "<n> s", text)
    return f"{type(exc).__name__}: {text}"


class BatchRunner:
    """Runs items over workers; see the module docstring for the rules.

    Give ``urls`` (ComfyUI servers) or ``workers`` (anything with :class:`~client.workers.Worker`'s
    methods); everything else is the same either way.
    """

    def __init__(self, *, workflow_name: str, workflow: dict, items: list[Item], urls: list[str] | None = None,
                 out_dir: Path, workers: list[Worker] | None = None, manifest_path: Path | None = None,
                 global_sets: list | None = None, image_ref: str | None = None, prompt_ref: str | None = None,
                 in_flight: int = 2, max_failures: int = 3, retry_base: float = 1.0, give_up_after: float = 600.0,
                 probe_interval: float = 2.0, timeouts: Timeouts | None = None, emit=None, progress: bool = True):
        self.job = Job.build(workflow_name, workflow, items, global_sets, image_ref, prompt_ref)
        self.workflow_name = workflow_name
        self.items_all = items
        self.out_dir = Path(out_dir)
        self.manifest = Manifest(manifest_path or self.out_dir / "manifest.jsonl")
        self.store = OutputStore(self.out_dir)
        self.in_flight = max(1, in_flight)
        self.max_failures = max(1, max_failures)
        self.retry_base = retry_base
        self.give_up_after = give_up_after
        self.probe_interval = probe_interval
        self.timeouts = timeouts or Timeouts()
        self.emit = emit or (lambda event: None)
        self.progress = progress
        if workers is None:
            workers = [ComfyWorker(u, self.timeouts) for u in dict.fromkeys(urls or [])]
        if not workers:
            raise WorkflowError("no server to run the batch on: give --server URL (repeatable)")
        self.states = [WorkerState(w, asyncio.Event()) for w in workers]
        self.pending: collections.deque[Item] = collections.deque()
        self.running = 0
        self.cond: asyncio.Condition | None = None
        self.finished: asyncio.Event | None = None
        self.stop_reason: str | None = None
        self.counts = collections.Counter()
        self.last: dict[str, dict] = {}  # the manifest's current record per item
        self.owner: dict[str, str] = {}  # output path → item whose current record lists it
        self.bar = None

    @property
    def config(self) -> str:
        return self.job.config

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

    # -- workers --------------------------------------------------------------------------------

    async def _probe(self, state: WorkerState) -> None:
        """Bring a worker back when it answers again (bounded backoff), then check it can run the job."""
        delay = self.probe_interval
        while not self.finished.is_set() and state.excluded is None:
            if not state.healthy.is_set():
                try:
                    await state.worker.probe()
                    if not state.checked:
                        await self._check(state)
                    if state.excluded is None:
                        state.healthy.set()
                        delay = self.probe_interval
                        self.emit({"event": "server_up", "server": state.name})
                        self._note(f"ComfyUI at {state.name} answers; it takes items")
                except ServerUnavailable as exc:
                    if not state.probed:
                        self._note(self._not_answering(state, exc))
                    delay = min(delay * 2, 30.0)
                except ClientError as exc:
                    self._exclude(state, exc)
                    state.probed = True
                    break
                state.probed = True
            await _wait_any([self.finished.wait()], delay if not state.healthy.is_set() else 0.5)

    def _not_answering(self, state: WorkerState, exc: Exception) -> str:
        others = [s for s in self.states if s is not state and s.excluded is None]
        if others:
            return (f"ComfyUI at {state.name} does not answer ({exc}); the other servers take the items meanwhile "
                    "and it is retried")
        return (f"ComfyUI at {state.name} does not answer ({exc}); retrying it until one answers, for up to "
                f"{self.give_up_after:g} s (--give-up-after)")

    async def _check(self, state: WorkerState) -> None:
        """Can this worker run the job at all (node classes, model files)? If not, drop it."""
        try:
            await state.worker.check(self.job)
        except ValidationFailed as exc:
            self._exclude(state, exc)
        state.checked = True

    def _exclude(self, state: WorkerState, exc: Exception) -> None:
        state.excluded = str(exc)
        self.emit({"event": "server_excluded", "server": state.name, "error": str(exc)})
        self._note(f"not using ComfyUI at {state.name}: {exc}")

    def _down(self, state: WorkerState, exc: Exception) -> None:
        if state.healthy.is_set():
            state.healthy.clear()
            state.checked = False  # it may come back without the pack or a model: check it again
            state.downs += 1
            self.emit({"event": "server_down", "server": state.name, "error": str(exc)})
            self._note(f"ComfyUI at {state.name} is down ({exc}); its items go to the other servers")

    # -- items ----------------------------------------------------------------------------------

    async def _slot(self, state: WorkerState) -> None:
        while True:
            while not state.healthy.is_set():
                if self.finished.is_set() or state.excluded:
                    return
                await _wait_any([state.healthy.wait(), self.finished.wait()], None)
            item = await self._next_item()
            if item is None:
                return
            if not state.healthy.is_set():
                await self._release(item, requeue=True, front=True)
                continue
            await self._run_item(state, item)

    async def _run_item(self, state: WorkerState, item: Item) -> None:
        item.attempts += 1
        started = time.time()
        tick = time.monotonic()
        try:
            rendered = await state.worker.render(self.job, item)
        except ServerUnavailable as exc:
            state.lost += 1
            state.busy_s += time.monotonic() - tick
            self._down(state, exc)
            await self._retry_or_fail(state, item, exc, limit=2 * self.max_failures, delay=0.0, front=True)
            return
        except (WorkflowError, ValidationFailed) as exc:
            state.busy_s += time.monotonic() - tick
            await self._fail(state, item, exc)
            return
        except ClientError as exc:  # refused, a node failed, interrupted: worth another try
            state.busy_s += time.monotonic() - tick
            delay = self.retry_base * 2 ** (item.failures[_signature(exc)])
            await self._retry_or_fail(state, item, exc, limit=self.max_failures, delay=delay, front=False)
            return
        state.busy_s += time.monotonic() - tick
        state.done += 1
        record = self._save(item, rendered, started)
        self.counts["done"] += 1
        self.emit({"event": "item_done", "item": item.key, "input": item.input, "server": rendered.server,
                   "prompt_id": rendered.prompt_id, "outputs": record["outputs"]})
        self._advance()
        await self._release(item, requeue=False)

    def _output_names(self, item: Item, rendered: Rendered) -> list[str]:
        names, counters = [], collections.Counter()
        for node_id, suffix, _ in rendered.pictures:
            counters[node_id] += 1
            rel = (item.subdir / output_name(item.stem, node_id, counters[node_id], suffix)).as_posix()
            if self.owner.get(rel, item.key) != item.key:  # another item's file: never overwrite it
                rel = (item.subdir / output_name(f"{item.stem}-{_key_hash(item.key)}", node_id, counters[node_id],
                                                 suffix)).as_posix()
            names.append(rel)
        return names

    def _save(self, item: Item, rendered: Rendered, started: float) -> dict:
        """Stage, record, commit (see :mod:`client.outputs`); returns the record."""
        rels = self._output_names(item, rendered)
        self.store.stage(rendered.prompt_id, [(rel, data) for rel, (_, _, data) in zip(rels, rendered.pictures)])
        record = self._record(item, "done", rendered.server, rendered.prompt_id, rels, None, started, rendered)
        self.manifest.append(record)
        previous = self.last.get(item.key) or {}
        replaced = (previous.get("outputs") or []) if previous.get("status") == "done" else []
        self._remember(record)
        self.store.commit(rendered.prompt_id, rels, replaced)
        return record

    def _remember(self, record: dict) -> None:
        previous = self.last.get(record["item"])
        if previous and previous.get("status") == "done" and record["status"] == "done":
            for rel in previous.get("outputs") or []:
                self.owner.pop(rel, None)
        self.last[record["item"]] = record
        for rel in record.get("outputs") or []:
            self.owner[rel] = record["item"]

    async def _retry_or_fail(self, state: WorkerState, item: Item, exc: Exception, limit: int, delay: float,
                             front: bool) -> None:
        signature = _signature(exc)
        item.failures[signature] += 1
        if item.failures[signature] >= limit:
            await self._fail(state, item, exc)
            return
        item.not_before = time.monotonic() + delay
        self.emit({"event": "item_retry", "item": item.key, "server": state.name, "error": str(exc),
                   "retry_in_s": round(delay, 3), "attempt": item.attempts})
        await self._release(item, requeue=True, front=front)

    async def _fail(self, state: WorkerState, item: Item, exc: Exception) -> None:
        state.failed += 1
        record = self._record(item, "failed", state.name, None, [], str(exc), None, None)
        self.manifest.append(record)
        self._remember(record)
        self.counts["failed"] += 1
        self.emit({"event": "item_failed", "item": item.key, "input": item.input, "server": state.name,
                   "error": str(exc)})
        self._note(f"failed: {item.input}: {exc}")
        self._advance()
        await self._release(item, requeue=False)

    def _record(self, item: Item, status: str, server: str, prompt_id, outputs: list[str], error, started,
                rendered: Rendered | None) -> dict:
        now = time.time()
        timings = {"finished_at": round(now, 3), "attempts": item.attempts}
        if rendered is not None:
            began = rendered.started_at or rendered.queued_at
            timings.update(queued_at=round(rendered.queued_at, 3),
                           started_at=round(rendered.started_at, 3) if rendered.started_at else None,
                           wait_s=round(began - rendered.queued_at, 3), run_s=round(rendered.finished_at - began, 3),
                           total_s=round(now - started, 3))
        return {"item": item.key, "input": item.input, "overrides": item.sets or {},
                "prompt": item.prompt_text, "workflow": self.workflow_name, "config": self.config,
                "server": server, "prompt_id": prompt_id, "outputs": outputs, "status": status,
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
            self.bar.set_postfix_str(" ".join(f"{s.name.split('//')[-1]}:{s.done}" for s in self.states))

    async def _watchdog(self) -> None:
        """Stop when every worker was dropped, or none has been usable for ``give_up_after`` seconds."""
        down_since = time.monotonic()
        while not self.finished.is_set():
            usable = [s for s in self.states if s.excluded is None]
            if not usable:
                self.stop_reason = "every server was dropped: " + "; ".join(s.excluded for s in self.states)
            elif any(s.healthy.is_set() for s in usable):
                down_since = None
            else:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.give_up_after:
                    names = ", ".join(s.name for s in usable)
                    self.stop_reason = (f"no ComfyUI server answered for {self.give_up_after:g} s (--give-up-after): "
                                        f"{names}. Start ComfyUI there or check the --server URLs, then run the "
                                        "same command again: finished items are kept")
            if self.stop_reason:
                async with self.cond:
                    self.cond.notify_all()
                self.finished.set()
                return
            await _wait_any([self.finished.wait()], 0.2)

    # -- entry point ----------------------------------------------------------------------------

    async def run(self) -> dict:
        started = time.monotonic()
        self.cond = asyncio.Condition()
        self.finished = asyncio.Event()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        history = self.manifest.records()
        self.store.recover(history)
        for record in history:
            self._remember(record)
        todo, skipped, other_config = [], 0, 0
        for item in self.items_all:
            record = self.last.get(item.key)
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
        probes = []
        try:
            if todo:
                probes = [asyncio.create_task(self._probe(s)) for s in self.states]
                slots = [asyncio.create_task(self._slot(s)) for s in self.states for _ in range(self.in_flight)]
                watchdog = asyncio.create_task(self._watchdog())
                await asyncio.gather(*slots)
                self.finished.set()
                await watchdog
            self.finished.set()
        finally:
            self.finished.set()
            for task in probes:
                task.cancel()
            await asyncio.gather(*probes, return_exceptions=True)
            for state in self.states:
                await state.worker.close()
            if self.bar is not None:
                self.bar.close()
            self.store.close()
        return self._summary(time.monotonic() - started, len(todo))

    def _summary(self, wall: float, todo: int) -> dict:
        left = todo - self.counts["done"] - self.counts["failed"]
        servers = []
        for state in self.states:
            servers.append({"server": state.name, "done": state.done, "failed": state.failed,
                            "requeued": state.lost, "went_down": state.downs, "excluded": state.excluded,
                            "busy_s": round(state.busy_s, 3),
                            "items_per_min": round(60.0 * state.done / wall, 2) if wall > 0 else None})
        return {"event": "summary", "workflow": self.workflow_name, "done": self.counts["done"],
                "failed": self.counts["failed"], "skipped": self.counts["skipped"], "left": max(left, 0),
                "wall_s": round(wall, 3), "stopped": self.stop_reason, "servers": servers,
                "manifest": str(self.manifest.path)}


def _key_hash(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]


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
    if summary.get("ray"):
        nodes = summary["ray"]["nodes"]
        lines.append("  on Ray nodes: " + (", ".join(f"{n}: {c} done" for n, c in sorted(nodes.items())) or "none"))
        if summary["ray"]["dashboard"]:
            lines.append(f"  Ray dashboard: {summary['ray']['dashboard']}")
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

    timeouts = Timeouts(stall=args.stall_timeout, request=args.request_timeout)
    pool, dashboard, in_flight = None, None, args.in_flight
    if args.ray is not None or args.ray_config:
        from .ray_workers import RayPool, connect, pool_spec

        section = _ray_options(args)
        raw = section["pools"].get("batch") or ({"urls": args.server} if args.server else None)
        if raw is None:
            raise WorkflowError("--ray needs servers: give --ray-config FILE with a ray.pools.batch section (actors, "
                                "num_gpus, comfyui_root, ...; docs/scale-out.md) to start them on the cluster, or "
                                "--server URL (repeatable) to attach one actor to each running server")
        spec = pool_spec("batch", raw)
        dashboard = connect(section["address"] or "local", section["runtime_env"])
        pool = RayPool("batch", spec, timeouts)
        in_flight = int(spec["in_flight"])
    runner = BatchRunner(
        workflow_name=Path(args.workflow).stem, workflow=workflow, items=items,
        workers=pool.workers if pool else None,
        urls=args.server or ["http://127.0.0.1:8188"], out_dir=Path(args.out),
        manifest_path=Path(args.manifest) if args.manifest else None, global_sets=sets,
        image_ref=args.image_node, prompt_ref=args.prompt_target, in_flight=in_flight,
        max_failures=args.max_failures, retry_base=args.retry_base, give_up_after=args.give_up_after,
        probe_interval=args.probe_interval, timeouts=timeouts, emit=emit, progress=not as_json)
    try:
        summary = await runner.run()
    finally:
        if pool is not None:
            pool.stop()
    if pool is not None:
        summary["ray"] = {"nodes": pool.node_counts(), "dashboard": dashboard}
    if as_json:
        emit(summary)
    else:
        console.err(format_summary(summary))
    return 0 if summary["failed"] == 0 and summary["left"] == 0 and not summary["stopped"] else 1


def _ray_options(args) -> dict:
    """The ``ray:`` section of ``--ray-config`` (or the file is the section), with ``--ray ADDRESS`` on top."""
    from .ray_workers import ray_section

    raw: dict = {}
    if args.ray_config:
        import yaml

        try:
            raw = yaml.safe_load(Path(args.ray_config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise WorkflowError(f"cannot read --ray-config '{args.ray_config}': {exc}") from exc
        if not isinstance(raw, dict):
            raise WorkflowError(f"--ray-config '{args.ray_config}' must be a mapping with a 'ray:' section")
        raw = raw.get("ray", raw) if set(raw) == {"ray"} else raw
    section = ray_section(raw)
    if args.ray not in (None, "local") or not section["address"]:
        section["address"] = args.ray or "local"
    return section
