"""Items on a Ray cluster: each actor owns one ComfyUI server, and the batch runner stays as it is.

Ray is one more kind of :class:`~client.workers.Worker`, not a second scheduler. :class:`client.batch.BatchRunner`
keeps the single queue, the retries, the failure rules and the exactly-once recording; what Ray adds is what a
hand-kept list of URLs cannot do on many machines: it starts each server on a node that has the resources asked
for (``num_gpus`` and friends), restarts the actor elsewhere when its process or node dies (``max_restarts``),
and carries pictures both ways, so the nodes need no shared file system:

* the driver (``python -m client batch|dataset --ray``) reads each input picture (inputs stay read-only) and
  sends the bytes with the item to an actor (:class:`RayWorker.render`);
* the actor (:class:`ComfyActor`) uploads them to its own ComfyUI server on ``127.0.0.1``, runs the prompt with
  the same code as a direct server (:meth:`client.workers.ComfyWorker.render_data`) and returns the pictures;
* the driver stages, records and commits them (:mod:`client.outputs`), so an item whose answer was lost with
  its node is simply run again elsewhere and recorded once.

A dead actor or node surfaces as :class:`~client.errors.ServerUnavailable` (Ray's ``RayActorError``): the runner
requeues the item at the front for the other actors and probes the dead one until Ray has restarted it (its
ComfyUI starts again, then it is checked for the workflow's nodes and models like any server).
Back-pressure is the runner's: ``in_flight`` slots per actor, so at most that many items (and their bytes) are
out per server. Ray itself is imported only when a pool starts: ``python -m client`` without ``--ray`` never
needs it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .comfy import Timeouts
from .errors import ClientError, ServerUnavailable, WorkflowError
from .files import read_picture
from .items import Item
from .workers import ComfyWorker, Job, Rendered, check_job

CLIENT_DIR = Path(__file__).resolve().parent

# One pool of actors (a service): how many, what each asks Ray for, and how each gets its ComfyUI server.
POOL_DEFAULTS: dict = {
    "actors": 1,              # servers to start (ignored when ``urls`` is given: one actor per URL)
    "num_gpus": 1,            # per actor; 0.5 puts two servers on one GPU, 0 runs ComfyUI with --cpu
    "num_cpus": 1,
    "resources": {},          # custom Ray resources per actor, e.g. {"a100": 1}
    "in_flight": 2,           # prompts out per server at once (the runner's back-pressure)
    "max_restarts": -1,       # Ray restarts a dead actor (-1: without limit) on any node that fits
    "urls": [],               # attach to running servers instead of starting them (the actor calls the URL)
    "comfyui_root": "",       # a ComfyUI checkout with EditKit in custom_nodes, at this path on every node
    "python": "",             # its interpreter (default: the actor's own)
    "extra_model_paths": "",  # an extra_model_paths.yaml on the node (models folder, custom_nodes)
    "args": [],               # more ComfyUI flags, e.g. ["--highvram"]
    "work_dir": "",           # where each server's input/output/temp/user folders go (default: the temp dir)
    "start_timeout": 300,     # seconds for a server to answer after it starts
}

RAY_DEFAULTS: dict = {
    "address": "",     # "" not on Ray; "local" starts a cluster on this machine; "auto" joins `ray start`'s
    "runtime_env": {},  # passed to ray.init (pip, env_vars, ...); the client package is always shipped
    "pools": {},        # name → POOL_DEFAULTS keys; batch uses "batch", the dataset factory "layered" and "edit"
}


def pool_spec(name: str, raw: dict | None) -> dict:
    """One pool's settings with defaults; an unknown key or a pool that can get no server is an error now."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise WorkflowError(f"ray.pools.{name} must be a mapping of: {', '.join(POOL_DEFAULTS)}")
    unknown = sorted(set(raw) - set(POOL_DEFAULTS))
    if unknown:
        raise WorkflowError(f"unknown key(s) ray.pools.{name}.{', '.join(unknown)}; allowed: "
                            f"{', '.join(POOL_DEFAULTS)}")
    spec = {**POOL_DEFAULTS, **raw}
    if isinstance(spec["urls"], str):
        spec["urls"] = [spec["urls"]] if spec["urls"] else []
    if isinstance(spec["args"], str):
        spec["args"] = spec["args"].split()
    if not spec["urls"] and not spec["comfyui_root"]:
        raise WorkflowError(f"ray.pools.{name} has neither comfyui_root (a ComfyUI checkout with EditKit on every "
                            "node, to start servers) nor urls (running servers to attach to); set one")
    if not spec["urls"] and int(spec["actors"]) < 1:
        raise WorkflowError(f"ray.pools.{name}.actors must be at least 1 (got {spec['actors']})")
    return spec


def ray_section(raw: dict | None) -> dict:
    """The ``ray:`` section with defaults; unknown keys are errors that name the allowed ones."""
    raw = raw or {}
    unknown = sorted(set(raw) - set(RAY_DEFAULTS))
    if unknown:
        raise WorkflowError(f"unknown key(s) ray.{', '.join(unknown)}; allowed: {', '.join(RAY_DEFAULTS)}")
    section = {**RAY_DEFAULTS, **raw}
    section["address"] = "" if section["address"] in (None, False) else str(section["address"])
    return section


def connect(address: str, runtime_env: dict | None = None) -> str | None:
    """Join (``auto``, ``HOST:PORT``, ``ray://...``) or start (``local``) a cluster; returns the dashboard URL.

    A driver that already called ``ray.init`` (a test, a notebook) keeps its connection. The client package
    travels in the job's ``runtime_env`` (``py_modules``), so nodes need ComfyUI and the pack, not this checkout.
    """
    import ray

    if ray.is_initialized():
        return None
    env = dict(runtime_env or {})
    env["py_modules"] = [*env.get("py_modules", []), str(CLIENT_DIR)]
    try:
        context = ray.init(address=None if address in ("", "local") else address, runtime_env=env,
                           logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClientError(f"cannot reach the Ray cluster at '{address}' ({exc}). Start it with `ray start --head` "
                          "(then --ray auto), give its address, or use --ray with no address for a local one") from exc
    return getattr(context, "dashboard_url", None) or None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """ComfyUI goes when its actor goes (killed, node lost), so a restarted actor never meets an orphan."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ComfyActor:
    """A Ray actor (see :class:`RayPool`) that owns one ComfyUI server, or attaches to one URL.

    Its methods answer with values, never raise the client's errors: ``("error", exc)`` carries the
    :class:`~client.errors.ClientError` back to the driver unchanged, which re-raises it, so the runner sees the
    same classes as with a direct server.
    """

    def __init__(self, label: str, spec: dict, url: str | None, timeouts: Timeouts):
        import ray

        self.label, self.spec, self.timeouts = label, spec, timeouts
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.node = f"{self.node_ip}/{self.node_id[:8]}"  # how summaries name the node
        self.proc: subprocess.Popen | None = None
        self.work: Path | None = None
        self.starts = 0
        self.answered = False
        self.url = url or self._start()
        self.worker = ComfyWorker(self.url, timeouts)

    # -- the server -----------------------------------------------------------------------------

    def _start(self) -> str:
        spec = self.spec
        base = spec["work_dir"] or None
        self.work = Path(tempfile.mkdtemp(prefix=f"editkit-{self.label.replace('/', '-')}-", dir=base))
        for name in ("input", "output", "temp", "user"):
            (self.work / name).mkdir()
        port = _free_port()
        cmd = [spec["python"] or sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--input-directory", str(self.work / "input"),
               "--output-directory", str(self.work / "output"), "--temp-directory", str(self.work / "temp"),
               "--user-directory", str(self.work / "user")]
        if spec["extra_model_paths"]:
            cmd += ["--extra-model-paths-config", str(spec["extra_model_paths"])]
        args = [str(a) for a in spec["args"]]
        if float(spec["num_gpus"]) == 0 and "--cpu" not in args:
            args.append("--cpu")  # no GPU was given to this actor: never take one Ray gave another
        self.log = self.work / "comfyui.log"
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this actor; the server inherits it.
        self.proc = subprocess.Popen(cmd + args, cwd=spec["comfyui_root"], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.starts += 1
        self.answered = False
        return f"http://127.0.0.1:{port}"

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:] if self.work else ""

    def where(self) -> dict:
        import ray

        return {"label": self.label, "node_id": self.node_id, "node_ip": self.node_ip, "url": self.url,
                "gpus": [str(g) for g in ray.get_gpu_ids()], "starts": self.starts}

    async def ready(self) -> tuple:
        """Wait for the server (up to ``start_timeout`` while it starts); one that crashed is started again,
        unless it has never answered in three starts (then the log says why)."""
        if self.proc is not None and self.proc.poll() is not None:
            if self.starts >= 3 and not self.answered:
                return "error", ServerUnavailable(f"ComfyUI on node {self.node_ip} exited {self.starts} times "
                                                  f"without answering; log: {self._log_tail()}")
            await self.worker.close()
            self.stop_server()
            self.url = self._start()
            self.worker = ComfyWorker(self.url, self.timeouts)
        starting = self.proc is not None and not self.answered
        deadline = time.monotonic() + (float(self.spec["start_timeout"]) if starting else 0.0)
        while True:
            try:
                await self.worker.probe()
                self.answered = True
                return "ok", self.where()
            except ServerUnavailable as exc:
                if self.proc is not None and self.proc.poll() is not None:
                    return "error", ServerUnavailable(f"ComfyUI on node {self.node_ip} exited "
                                                      f"({self.proc.returncode}); log: {self._log_tail()}")
                if time.monotonic() >= deadline:
                    return "error", exc
            await asyncio.sleep(0.25)

    async def object_info(self) -> tuple:
        try:
            return "ok", await self.worker.server.object_info(refresh=True)
        except ClientError as exc:
            return "error", exc

    async def render(self, job: Job, item: Item, data: bytes | None) -> tuple:
        try:
            rendered = await self.worker.render_data(job, item, data)
        except ClientError as exc:
            return "error", exc
        rendered.server = f"{self.label}@{self.node_ip}"
        return "ok", rendered, self.node

    def stop_server(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None

    async def stop(self) -> None:
        await self.worker.close()
        self.stop_server()


def _unavailable(worker: RayWorker, exc: Exception) -> ServerUnavailable:
    return ServerUnavailable(f"Ray actor {worker.name} is unavailable ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); Ray restarts it where resources allow")


class RayWorker:
    """The driver's side of one :class:`ComfyActor`: the :class:`~client.workers.Worker` the runner uses."""

    def __init__(self, actor, name: str, spec: dict, timeouts: Timeouts):
        self.actor, self.name, self.spec, self.timeouts = actor, name, spec, timeouts
        self.nodes: collections.Counter = collections.Counter()  # node (ip/id) → items this actor rendered there
        self.where: dict = {}  # the actor's last answer to ready(): node, server URL, GPUs

    async def _call(self, ref, timeout: float | None):
        import ray

        try:
            answer = await asyncio.wait_for(ref, timeout) if timeout else await ref
        except asyncio.TimeoutError as exc:
            ray.cancel(ref)
            raise ServerUnavailable(f"Ray actor {self.name} did not answer within {timeout:g} s (being placed or "
                                    "restarted?)") from exc
        except asyncio.CancelledError:
            ray.cancel(ref)  # the runner gave up on the item: the actor cancels its ComfyUI prompt
            raise
        except ray.exceptions.RayTaskError as exc:  # a fault in the actor's code, not the item's: worth a retry
            raise ClientError(f"Ray actor {self.name} failed: {str(exc)[:500]}") from exc
        except ray.exceptions.RayError as exc:  # the actor or its node died, or is being restarted
            raise _unavailable(self, exc) from exc
        if answer[0] == "error":
            raise answer[1]
        return answer[1:]

    async def probe(self) -> None:
        (self.where,) = await self._call(self.actor.ready.remote(), float(self.spec["start_timeout"]) + 30)

    async def object_info(self) -> dict:
        (info,) = await self._call(self.actor.object_info.remote(), 120)
        return info

    async def check(self, job: Job) -> None:
        check_job(job, await self.object_info(), self.name)

    async def render(self, job: Job, item: Item) -> Rendered:
        data = read_picture(Path(item.picture)) if item.picture is not None else None
        rendered, node = await self._call(self.actor.render.remote(job, item, data), None)
        self.nodes[node] += 1
        return rendered

    async def close(self) -> None:
        """Nothing to release here: the pool owns the actors (:meth:`RayPool.stop`)."""


class RayPool:
    """The actors of one service (``batch``, ``layered``, ``edit``), each with its own resource request."""

    def __init__(self, name: str, spec: dict, timeouts: Timeouts | None = None):
        import ray

        self.name, self.spec = name, spec
        self.timeouts = timeouts or Timeouts()
        options = {"num_cpus": float(spec["num_cpus"]), "num_gpus": float(spec["num_gpus"]),
                   "resources": dict(spec["resources"]), "max_restarts": int(spec["max_restarts"]),
                   "max_task_retries": 0}  # a lost item goes back to the runner's queue, never re-run by Ray
        actor_class = ray.remote(ComfyActor)
        urls = list(spec["urls"])
        if urls:
            options.update(num_gpus=0)  # attached servers hold their own GPUs
        count = len(urls) or int(spec["actors"])
        self.workers = []
        for index in range(count):
            label = f"{name}/{index}"
            actor = actor_class.options(**options).remote(label, spec, urls[index] if urls else None, self.timeouts)
            self.workers.append(RayWorker(actor, f"ray:{label}", spec, self.timeouts))

    def node_counts(self) -> dict[str, int]:
        """Items rendered per node (``ip/short node id``), over every actor of the pool."""
        total: collections.Counter = collections.Counter()
        for worker in self.workers:
            total.update(worker.nodes)
        return dict(total)

    def stop(self) -> None:
        """Stop every server cleanly (its temporary folders go too), then the actors, without restarts."""
        import ray

        refs = [w.actor.stop.remote() for w in self.workers]
        with contextlib.suppress(ray.exceptions.RayError):
            ray.wait(refs, num_returns=len(refs), timeout=30)
        for worker in self.workers:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(worker.actor, no_restart=True)


def _with_node(fn, *args):
    import ray

    context = ray.get_runtime_context()
    return fn(*args), f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:8]}"


def map_on_cluster(fn, count: int, args_for, spec: dict, in_flight: int = 8):
    """Yield ``(index, fn(*args_for(index)), node)`` for index 0 .. count-1, run as Ray tasks spread over the
    nodes (``SPREAD``) with the pool's CPU and custom-resource request, at most ``in_flight`` at once, in the
    order they finish.

    For pure functions only (the dataset factory's ``--mock`` stand-ins): a task lost with its node is run again
    by Ray (``max_retries``), which is harmless for a function of its arguments, and the caller records each
    result once. Work on ComfyUI servers goes through :class:`RayPool` and the batch runner instead.
    """
    import ray

    task = ray.remote(_with_node).options(num_cpus=float(spec["num_cpus"]), resources=dict(spec["resources"]),
                                          scheduling_strategy="SPREAD", max_retries=3)
    waiting: dict = {}
    next_index = 0
    while next_index < count or waiting:
        while next_index < count and len(waiting) < in_flight:
            waiting[task.remote(fn, *args_for(next_index))] = next_index
            next_index += 1
        ready, _ = ray.wait(list(waiting), num_returns=1)
        index = waiting.pop(ready[0])
        result, node = ray.get(ready[0])
        yield index, result, node


def describe(pools: list[RayPool], dashboard: str | None) -> list[str]:
    """Summary lines: per-node counts, and where to watch the cluster."""
    lines = []
    for pool in pools:
        counts = pool.node_counts()
        if counts:
            lines.append(f"  ray pool {pool.name}: " + ", ".join(f"node {n}: {c}" for n, c in sorted(counts.items())))
    if dashboard:
        lines.append(f"  Ray dashboard: {dashboard if '://' in dashboard else 'http://' + dashboard}")
    return lines

