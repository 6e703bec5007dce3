"""Measure the client: overhead per item, resume time, and (with real ComfyUI) 1 vs 2 servers.

    python scripts/benchmark_client.py               # fake server: overhead (200 items), resume (10,000)
    python scripts/benchmark_client.py --comfyui-root /path/to/ComfyUI --comfyui-python /path/to/python \\
        --models /path/to/tiny/models                 # also batch throughput on 1 vs 2 real CPU servers

Overhead compares ``ComfyServer.run`` (validation against /object_info, WebSocket follow, history) with
the least a script must do for the same prompt: POST /prompt, wait on the WebSocket for the end, GET
/history. Both run against the in-process fake server (the test double in ``tests/client/fake_comfy.py``),
so the difference is the client's own cost.
The tiny models tree comes from ``python tests/make_tiny_models.py DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "client"))

from fake_comfy import FakeComfy, free_port, minimal_object_info  # noqa: E402

from client import console  # noqa: E402
from client.batch import BatchRunner, Item, picture_items  # noqa: E402
from client.comfy import ComfyServer  # noqa: E402
from client.manifest import Manifest  # noqa: E402
from client.workflow import load_workflow  # noqa: E402


def _prompt(image: str) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench/out"}}}


async def _bare(url: str, prompt: dict, count: int) -> list[float]:
    times = []
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client_id}") as ws:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as answer:
                prompt_id = (await answer.json())["prompt_id"]
            async for message in ws:
                data = json.loads(message.data)
                if data["type"] == "executing" and data["data"].get("node") is None \
                        and data["data"].get("prompt_id") == prompt_id:
                    break
            async with session.get(f"{url}/history/{prompt_id}") as answer:
                await answer.json()
            times.append(time.perf_counter() - started)
    return times


async def _client(url: str, prompt: dict, count: int) -> list[float]:
    times = []
    async with ComfyServer(url) as server:
        server.uploaded.add(prompt["1"]["inputs"]["image"])
        for _ in range(count):
            started = time.perf_counter()
            await server.run(prompt)
            times.append(time.perf_counter() - started)
    return times


def overhead(count: int) -> dict:
    with FakeComfy(minimal_object_info(["bench.png"])) as fake:
        buffer = tempfile.SpooledTemporaryFile()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
        buffer.seek(0)
        fake.uploads["bench.png"] = buffer.read()
        prompt = _prompt("bench.png")
        asyncio.run(_bare(fake.url, prompt, 10))  # warm-up
        bare = asyncio.run(_bare(fake.url, prompt, count))
        client = asyncio.run(_client(fake.url, prompt, count))
    b, c = statistics.median(bare) * 1000, statistics.median(client) * 1000
    return {"items": count, "bare_ms_median": round(b, 2), "client_ms_median": round(c, 2),
            "overhead_ms_per_item": round(c - b, 2), "bare_total_s": round(sum(bare), 2),
            "client_total_s": round(sum(client), 2)}


def resume(count: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        workflow = load_workflow("ben2_flux_fill_background")
        items = [Item(key=f"prompt:{i:08d}", input=f"prompt {i}", prompt_text=f"prompt {i}") for i in range(count)]
        runner = BatchRunner(workflow_name="bench", workflow=workflow, items=items, urls=["http://127.0.0.1:9"],
                             out_dir=out, progress=False)
        manifest = Manifest(out / "manifest.jsonl")
        lines = [json.dumps({"item": i.key, "input": i.input, "status": "done", "config": runner.config,
                             "outputs": [f"item_{n}.png"], "prompt_id": str(uuid.uuid4()), "server": "x",
                             "timings": {"total_s": 1.0}}) for n, i in enumerate(items)]
        manifest.path.write_text("\n".join(lines) + "\n")
        started = time.perf_counter()
        loaded = manifest.load()
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        summary = asyncio.run(runner.run())
        run_s = time.perf_counter() - started
    return {"items": count, "manifest_load_s": round(load_s, 3), "resume_run_s": round(run_s, 3),
            "skipped": summary["skipped"], "loaded": len(loaded)}


def _start_comfy(root: str, python: str, models: Path, work: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """A real ComfyUI with EditKit on the tiny models; ``threads`` caps torch's threads so two servers on
    one machine do not oversubscribe its cores (each stands for a machine or GPU of its own)."""
    packs = work / "packs"
    packs.mkdir(parents=True, exist_ok=True)
    link = packs / "EditKit"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    port = free_port()
    config = work / f"paths_{port}.yaml"
    folders = {p.name: str(p) for p in models.iterdir() if p.is_dir()}
    config.write_text(json.dumps({"bench": {"custom_nodes": str(packs), **folders}}))
    dirs = {n: work / f"{n}_{port}" for n in ("input", "output", "temp", "user")}
    for d in dirs.values():
        d.mkdir()
    proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--extra-model-paths-config", str(config), "--disable-auto-launch", "--disable-api-nodes",
                             "--input-directory", str(dirs["input"]), "--output-directory", str(dirs["output"]),
                             "--temp-directory", str(dirs["temp"]), "--user-directory", str(dirs["user"]),
                             "--database-url", "sqlite:///:memory:"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/object_info/EditKitBEN2Loader", timeout=5) as answer:
                if json.loads(answer.read()):
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"ComfyUI at {url} did not start with EditKit within 300 s")


def ben2_batch_setup(root: str, python: str, models: Path, work: Path, count: int):
    """The real-server benchmarks' job: ``count`` small pictures, BEN2 at 128 px, two ComfyUI servers sharing the
    CPU cores. Returns (picture folder, workflow, [(process, url), ...])."""
    folder = work / "pictures"
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (64, 64), (20 * i % 256, 90, 160)).save(folder / f"p{i}.png")
    workflow = load_workflow("ben2_remove_background")
    workflow["3"]["inputs"]["resolution"] = 128
    threads = max(1, (os.cpu_count() or 2) // 2)
    return folder, workflow, [_start_comfy(root, python, models, work, threads) for _ in range(2)]


def real_servers(root: str, python: str, models: Path, count: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder, workflow, servers = ben2_batch_setup(root, python, models, work, count)
        try:
            for n in (1, 2):
                urls = [url for _, url in servers[:n]]
                warm = BatchRunner(workflow_name="warm", workflow=workflow, items=picture_items([folder])[:n * 2],
                                   urls=urls, out_dir=work / f"warm{n}", progress=False)
                asyncio.run(warm.run())
                runner = BatchRunner(workflow_name="bench", workflow=workflow, items=picture_items([folder]),
                                     urls=urls, out_dir=work / f"out{n}", progress=False)
                summary = asyncio.run(runner.run())
                results[f"{n}_server_items_per_s"] = round(summary["done"] / summary["wall_s"], 3)
        finally:
            for proc, _ in servers:
                proc.kill()
                proc.wait()
    results["ratio_2_vs_1"] = round(results["2_server_items_per_s"] / results["1_server_items_per_s"], 2)
    results["cpu_cores"] = os.cpu_count()
    results["torch_threads_per_server"] = max(1, (os.cpu_count() or 2) // 2)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/benchmark_client.py", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--resume-items", type=int, default=10_000)
    parser.add_argument("--comfyui-root", default=os.environ.get("COMFYUI_ROOT"))
    parser.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON"))
    parser.add_argument("--models", help="tiny models tree (python tests/make_tiny_models.py DIR)")
    parser.add_argument("--real-items", type=int, default=12)
    args = parser.parse_args(argv)
    console.event({"overhead": overhead(args.items)})
    console.event({"resume": resume(args.resume_items)})
    if args.comfyui_root and args.models:
        console.event({"real_servers": real_servers(args.comfyui_root, args.comfyui_python or "python",
                                                    Path(args.models), args.real_items)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
