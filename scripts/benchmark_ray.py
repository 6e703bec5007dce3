"""Measure the client on Ray: the per-item cost of going through an actor, and items/minute with and without Ray.

    python scripts/benchmark_ray.py                  # fake server: Ray's per-item overhead (100 items)
    python scripts/benchmark_ray.py --comfyui-root /path/to/ComfyUI --comfyui-python /path/to/python \\
        --models /path/to/tiny/models                # also items/min on 1 vs 2 real CPU servers, Ray and not

Overhead: the same items (a 64×64 picture, LoadImage → SaveImage) rendered by the client straight against one
server (:class:`client.workers.ComfyWorker`, the "bare" call) and by a Ray actor that owns nothing but a client
for the same server (:class:`client.ray_workers.RayWorker` attached to its URL): the picture goes to the actor,
the outputs come back. The server is the in-process fake (``tests/client/fake_comfy.py``), so the difference
is Ray's cost per item. Rounds alternate (bare, Ray, bare, ...); medians are reported.

Throughput: two real ComfyUI servers with EditKit on the tiny models (BEN2 at 128 px); a batch over 1 and then
2 servers, listed by URL (no Ray) and through Ray actors attached to the same servers, alternating, medians of
``--rounds``. Each server's torch gets half the cores, so two servers stand for two GPUs without fighting over
them. The servers and the actors are started once, before the clock (a pool lives for a whole batch; Ray-owned
servers start the same way as these).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "client"))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_client import ben2_batch_setup  # noqa: E402
from fake_comfy import FakeComfy, minimal_object_info  # noqa: E402

from client import console  # noqa: E402
from client.batch import BatchRunner, Item, picture_items  # noqa: E402
from client.comfy import Timeouts  # noqa: E402
from client.ray_workers import RayPool, connect, pool_spec  # noqa: E402
from client.workers import ComfyWorker, Job  # noqa: E402

PROMPT = {"1": {"class_type": "LoadImage", "inputs": {"image": "bench.png"}},
          "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench/out"}}}


async def _timed(worker, job: Job, items: list[Item]) -> list[float]:
    times = []
    for item in items:
        started = time.perf_counter()
        await worker.render(job, item)
        times.append(time.perf_counter() - started)
    return times


def overhead(count: int, rounds: int, work: Path) -> dict:
    picture = work / "bench.png"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    picture.write_bytes(buffer.getvalue())
    items = [Item(key=f"i{n}", input=str(picture), picture=picture, stem=f"i{n}") for n in range(count)]
    job = Job.build("bench", PROMPT, items)
    bare, on_ray = [], []
    with FakeComfy(minimal_object_info(["bench.png"])) as fake:
        pool = RayPool("bench", pool_spec("bench", {"urls": [fake.url], "num_cpus": 0}), Timeouts())
        ray_worker = pool.workers[0]

        async def measure():
            direct = ComfyWorker(fake.url)
            await ray_worker.probe()
            await _timed(direct, job, items[:5])  # warm-up: connections, object_info caches, the actor's imports
            await _timed(ray_worker, job, items[:5])
            for _ in range(rounds):
                bare.extend(await _timed(direct, job, items))
                on_ray.extend(await _timed(ray_worker, job, items))
            await direct.close()

        try:
            asyncio.run(measure())
        finally:
            pool.stop()
    b, r = statistics.median(bare) * 1000, statistics.median(on_ray) * 1000
    return {"items": count * rounds, "bare_ms_median": round(b, 2), "ray_ms_median": round(r, 2),
            "ray_overhead_ms_per_item": round(r - b, 2), "ratio": round(r / b, 2)}


def _items_per_min(workflow: dict, folder: Path, out: Path, workers=None, urls=None) -> float:
    runner = BatchRunner(workflow_name="bench", workflow=workflow, items=picture_items([folder]), urls=urls,
                         workers=workers, out_dir=out, progress=False)
    summary = asyncio.run(runner.run())
    if summary["done"] != len(runner.items_all):
        raise RuntimeError(f"the benchmark batch did not finish: {summary}")
    return 60.0 * summary["done"] / summary["wall_s"]


def throughput(root: str, python: str, models: Path, count: int, rounds: int, work: Path) -> dict:
    folder, workflow, servers = ben2_batch_setup(root, python, models, work, count)
    results: dict = {}
    try:
        urls = [url for _, url in servers]
        for n in (1, 2):
            # The actors start before the clock (like the servers): a pool lives as long as the cluster's job.
            pool = RayPool("bench", pool_spec("bench", {"urls": urls[:n], "num_cpus": 0}), Timeouts())
            plain, on_ray = [], []
            try:
                for index in range(rounds + 1):  # round 0 warms the servers and the actors up; not counted
                    tag = f"{n}_{index}"
                    plain.append(_items_per_min(workflow, folder, work / f"out{tag}", urls=urls[:n]))
                    on_ray.append(_items_per_min(workflow, folder, work / f"ray{tag}", workers=pool.workers))
            finally:
                pool.stop()
            plain, on_ray = plain[1:], on_ray[1:]
            results[f"{n}_server_items_per_min"] = round(statistics.median(plain), 1)
            results[f"{n}_server_ray_items_per_min"] = round(statistics.median(on_ray), 1)
    finally:
        for proc, _ in servers:
            proc.kill()
            proc.wait()
    results["ray_vs_plain_2_servers"] = round(results["2_server_ray_items_per_min"] /
                                              results["2_server_items_per_min"], 2)
    results["2_vs_1_servers_plain"] = round(results["2_server_items_per_min"] / results["1_server_items_per_min"], 2)
    results.update(items=count, rounds=rounds, cpu_cores=os.cpu_count(), torch_threads_per_server=max(1, (os.cpu_count() or 2) // 2))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/benchmark_ray.py", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50, help="items per overhead round (default 50)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--comfyui-root", default=os.environ.get("COMFYUI_ROOT"))
    parser.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON") or sys.executable)
    parser.add_argument("--models", help="tiny models tree (python tests/make_tiny_models.py DIR)")
    parser.add_argument("--real-items", type=int, default=12)
    parser.add_argument("--ray", default="local", help="cluster address (default: start a local one)")
    args = parser.parse_args(argv)
    connect(args.ray, {"env_vars": {"OMP_NUM_THREADS": "1"}})
    with tempfile.TemporaryDirectory() as tmp:
        console.event({"ray_overhead": overhead(args.items, args.rounds, Path(tmp))})
        if args.comfyui_root and args.models:
            console.event({"throughput": throughput(args.comfyui_root, args.comfyui_python, Path(args.models),
                                                    args.real_items, args.rounds, Path(tmp))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
