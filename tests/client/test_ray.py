"""Batch and the dataset factory on a Ray cluster (issue 22): a head and two worker nodes on this machine
(``ray.cluster_utils.Cluster``), each worker node running one real ComfyUI 0.3.64 server with EditKit and the tiny
models, owned by a Ray actor.

Needs ``COMFYUI_ROOT`` (and ray); skipped otherwise. The nodes are small (one CPU each, 80 MB object store); the
servers are placed one per worker node by a custom resource, as GPUs would place them on a real cluster.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from client_helpers import client_env
from PIL import Image

from client.comfy import Timeouts
from client.errors import ExecutionFailed, Problem, ValidationFailed, WorkflowError
from client.ray_workers import pool_spec, ray_section

ROOT = Path(__file__).resolve().parents[2]
STORE = 80 * 1024 * 1024


def test_client_errors_cross_the_actor_boundary_intact():
    """An actor answers with the client's own exception; the driver re-raises it, so it must survive pickling with
    every field (ValidationFailed's __init__ takes the problems, not the message)."""
    import pickle

    failed = ValidationFailed("http://a:1", [Problem("3", "image", "no picture")])
    again = pickle.loads(pickle.dumps(failed))
    assert str(again) == str(failed) and again.problems[0].text == "no picture" and again.server == "http://a:1"
    run = pickle.loads(pickle.dumps(ExecutionFailed("node 4 failed", "4", "RuntimeError")))
    assert (str(run), run.node_id, run.exception_type) == ("node 4 failed", "4", "RuntimeError")


def test_pool_and_section_errors_say_what_to_set(capsys, tmp_path):
    with pytest.raises(WorkflowError, match=r"ray.pools.edit has neither comfyui_root .* nor urls"):
        pool_spec("edit", {"actors": 2})
    with pytest.raises(WorkflowError, match=r"unknown key\(s\) ray.pools.edit.gpus; allowed: actors, num_gpus"):
        pool_spec("edit", {"gpus": 1, "urls": ["http://a:1"]})
    with pytest.raises(WorkflowError, match=r"unknown key\(s\) ray.adress; allowed: address, runtime_env, pools"):
        ray_section({"adress": "auto"})
    from client.__main__ import main

    folder = picture_folder(tmp_path / "in", 1)
    assert main(["batch", "ben2_remove_background", "--input", str(folder), "--out", str(tmp_path / "out"),
                 "--ray"]) == 1
    assert "--ray needs servers: give --ray-config FILE" in capsys.readouterr().err
    assert pool_spec("edit", {"urls": "http://a:1"})["urls"] == ["http://a:1"]


# -- a cluster with two ComfyUI servers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (no server resource) and two worker nodes with one ``editkit_server`` slot each, this process its
    driver. Without ComfyUI it serves the fake-server tests; with it, ``cluster`` puts a real server on each."""
    ray = pytest.importorskip("ray", reason="pip install -r requirements-ray.txt")
    from ray.cluster_utils import Cluster

    from client.ray_workers import connect

    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                         "include_dashboard": False})
    try:
        nodes = [head.add_node(num_cpus=1, resources={"editkit_server": 1}, object_store_memory=STORE)
                 for _ in range(2)]
        head.wait_for_nodes()
        connect(head.address)
        yield {"cluster": head, "nodes": nodes, "ray": ray}
    finally:
        ray.shutdown()
        head.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_cluster, request, tmp_path_factory):
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        pytest.skip("set COMFYUI_ROOT to run batch and the dataset factory on a Ray cluster with real ComfyUI servers")
    tiny_models = request.getfixturevalue("tiny_models")  # only now: writing them takes a while
    from client.ray_workers import RayPool

    base = tmp_path_factory.mktemp("ray")
    packs = base / "packs"
    packs.mkdir()
    (packs / "EditKit").symlink_to(ROOT, target_is_directory=True)
    paths = base / "extra_model_paths.yaml"
    folders = {p.name: str(p) for p in tiny_models.iterdir() if p.is_dir()}
    paths.write_text(yaml.safe_dump({"editkit_ray_tests": {"custom_nodes": str(packs), **folders}}))
    spec = pool_spec("batch", {
        "actors": 2, "num_gpus": 0, "num_cpus": 0, "resources": {"editkit_server": 1}, "comfyui_root": root,
        "python": os.environ.get("COMFYUI_PYTHON") or sys.executable, "extra_model_paths": str(paths),
        "args": ["--disable-api-nodes", "--database-url", "sqlite:///:memory:"], "start_timeout": 240,
        "max_restarts": -1})
    pool = RayPool("batch", spec, Timeouts(connect=3, request=20, poll=1, poll_ws_down=0.3, stall=120, heartbeat=2))
    try:
        async def started():
            for worker in pool.workers:
                await worker.probe()

        asyncio.run(started())
        yield {**ray_cluster, "pool": pool}
    finally:
        pool.stop()


def test_killed_actor_is_restarted_by_ray_and_its_items_are_recorded_once(ray_cluster, object_info, tmp_path):
    """Two actors attached to two fake servers; the first actor's process is killed after its first item: its
    items in flight go to the other, Ray restarts it, it is probed back and takes items again; 16 items, each
    recorded once (no ComfyUI needed)."""
    from fake_comfy import FakeComfy, Faults

    from client.batch import BatchRunner, picture_items
    from client.ray_workers import RayPool
    from client.workflow import load_workflow

    ray = ray_cluster["ray"]
    servers = [FakeComfy(object_info, faults=Faults(node_seconds=0.05)).start() for _ in range(2)]
    killed: list = []
    pool = RayPool("fake", pool_spec("fake", {"urls": [s.url for s in servers], "num_cpus": 0}),
                   Timeouts(connect=2, request=5, poll=0.3, poll_ws_down=0.1, stall=5, heartbeat=1))
    events: list = []

    def emit(event):
        events.append(event)
        if event["event"] == "item_done" and event["server"].startswith("fake/0@") and not killed:
            killed.append(event["item"])
            # the other server slows down until the actor is back, so items are still queued when it returns
            # (on a loaded machine Ray's restart took longer than the whole batch: nothing left to show it works)
            servers[1].faults.node_seconds = 2.0
            ray.kill(pool.workers[0].actor, no_restart=False)  # as a crash: Ray may restart it
        if event["event"] == "server_up" and event.get("server") == "ray:fake/0" and killed:
            servers[1].faults.node_seconds = 0.05

    runner = BatchRunner(workflow_name="ben2_remove_background", workflow=load_workflow("ben2_remove_background"),
                         items=picture_items([picture_folder(tmp_path / "in", 16)]), workers=list(pool.workers),
                         out_dir=tmp_path / "out", probe_interval=0.2, retry_base=0.05, emit=emit, progress=False)
    try:
        summary = asyncio.run(asyncio.wait_for(runner.run(), 120))
    finally:
        pool.stop()
        for server in servers:
            server.stop()
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert summary["done"] == 16 and summary["failed"] == 0
    assert sorted(collections.Counter(r["item"] for r in records).values()) == [1] * 16
    kinds = [(e["event"], e.get("server")) for e in events]
    down = kinds.index(("server_down", "ray:fake/0"))
    back = kinds.index(("server_up", "ray:fake/0"), down)
    assert any(k == "item_done" and s.startswith("fake/0@") for k, s in kinds[back:]), "the restarted actor idled"
    assert ("item_retry", "ray:fake/0") in kinds[down:]  # the item in flight went back to the queue
    outputs = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert outputs == sorted(rel for r in records for rel in r["outputs"])


def picture_folder(root: Path, count: int, size=(64, 64)) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", size, (30 * i % 256, 120, 200)).save(root / f"pic{i}.png")
    return root


def digest_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_servers_are_placed_one_per_worker_node(cluster):
    places = [w.where for w in cluster["pool"].workers]
    worker_nodes = {n.node_id for n in cluster["nodes"]}
    assert {p["node_id"] for p in places} == worker_nodes  # one server on each worker node, none on the head
    assert all(p["url"].startswith("http://127.0.0.1:") for p in places)


def test_dataset_factory_on_the_cluster_exports_what_the_local_run_exports(cluster, tmp_path):
    """Server mode with the work spread by Ray (pools attached to the cluster's servers, decompose and edit on
    different pools) writes the same export, byte for byte, as the local run on the same servers listed by URL."""
    from client.dataset.config import load_config
    from client.dataset.stages import Factory

    urls = [w.where["url"] for w in cluster["pool"].workers]
    data = tmp_path / "data"
    for i in range(3):
        folder = data / "物理变化" / f"{i:04d}_sample"
        folder.mkdir(parents=True)
        Image.new("RGB", (64, 64), (40 * i, 120, 200 - 30 * i)).save(folder / f"{i:04d}_sample.png")
    common = [
        f"inputs.roots=[{data}]", "instructions.default=[make it rain]", "instructions.templates={}",
        "decompose.resolution=64", "decompose.steps=2", "decompose.layers=2",
        'decompose.overrides={"Decompose.prompt": "a coloured square"}', "generate.mask_layer=1",
        'generate.overrides={"4.steps": 2, "2.max_sequence_length": 64}',
        f"services.layered.endpoint=[{urls[0]}]", f"services.edit.endpoint=[{urls[0]},{urls[1]}]"]
    stages = ["ingest", "decompose", "generate", "export", "qa"]
    local = Factory(load_config(None, [f"outputs={tmp_path / 'local'}", *common]), mock_mode=False).run(stages)
    on_ray = Factory(load_config(None, [
        f"outputs={tmp_path / 'ray'}", *common, f"ray.address={cluster['cluster'].address}",
        f'ray.pools={{"layered": {{"urls": ["{urls[1]}"], "num_cpus": 0}}, '
        f'"edit": {{"urls": ["{urls[0]}", "{urls[1]}"], "num_cpus": 0, "in_flight": 1}}}}']),
        mock_mode=False).run(stages)
    assert local["qa"] == on_ray["qa"] and local["qa"]["pairs"] == 3
    exported = digest_tree(tmp_path / "local" / "dataset")
    assert exported and digest_tree(tmp_path / "ray" / "dataset") == exported
    assert sum(on_ray["ray_nodes"]["edit"].values()) == 3 and sum(on_ray["ray_nodes"]["layered"].values()) == 3
    records = [json.loads(line) for line in (tmp_path / "ray" / "manifests" / "comfy_edit.jsonl").read_text(
        "utf-8").splitlines()]
    assert {r["server"].split("@")[0] for r in records} <= {"edit/0", "edit/1"}


def test_dataset_mock_on_the_cluster_exports_what_the_local_mock_run_exports(ray_cluster, tmp_path):
    """``--mock`` with the ray section set runs the stand-ins as Ray tasks spread over the nodes (a rehearsal of
    the cluster without servers); the driver writes and records the results: the export is the local one."""
    from client.dataset.config import load_config
    from client.dataset.stages import Factory

    stages = ["ingest", "decompose", "generate", "export", "qa"]
    data = f"inputs.roots=[{ROOT / 'client' / 'dataset' / 'example_data'}]"
    local = Factory(load_config(None, [f"outputs={tmp_path / 'local'}", data]), mock_mode=True).run(stages)
    on_ray = Factory(load_config(None, [f"outputs={tmp_path / 'ray'}", data,
                                        f"ray.address={ray_cluster['cluster'].address}",
                                        'ray.pools={"edit": {"num_cpus": 1}}']),
                     mock_mode=True).run(stages)
    assert "ray_nodes" not in local and local["qa"] == on_ray["qa"]
    exported = digest_tree(tmp_path / "local" / "dataset")
    assert exported and digest_tree(tmp_path / "ray" / "dataset") == exported
    samples, pairs = local["qa"]["samples"], local["qa"]["pairs"]
    assert sum(on_ray["ray_nodes"]["layered"].values()) == samples
    assert sum(on_ray["ray_nodes"]["edit"].values()) == pairs
    assert len(on_ray["ray_nodes"]["edit"]) >= 2  # spread: one CPU per task, one CPU per node


def test_batch_survives_losing_a_worker_node_mid_run(cluster, tmp_path):
    """8 pictures from a read-only folder over the two servers; when the first server has finished an item (and
    has another in flight) its whole node is removed: the item in flight goes to the other node, all 8 are done
    exactly once, the manifest lists exactly the output files, and the input folder is unchanged."""
    from client.batch import BatchRunner, picture_items
    from client.workflow import load_workflow

    pool = cluster["pool"]
    victim = pool.workers[0]
    node = next(n for n in cluster["nodes"] if n.node_id == victim.where["node_id"])
    folder = picture_folder(tmp_path / "in", 8)
    read_only(folder)
    before = digest_tree(folder)
    events: list = []
    removal: list = []

    def emit(event):
        events.append(event)
        if event["event"] == "item_done" and event["server"].startswith("batch/0@") and not removal:
            removal.append(threading.Thread(target=cluster["cluster"].remove_node, args=(node,), daemon=True))
            removal[0].start()

    workflow = load_workflow("ben2_remove_background")
    workflow["3"]["inputs"]["resolution"] = 128
    runner = BatchRunner(workflow_name="ben2_remove_background", workflow=workflow, items=picture_items([folder]),
                         workers=list(pool.workers), out_dir=tmp_path / "out", in_flight=2, probe_interval=0.5,
                         timeouts=pool.timeouts, emit=emit, progress=False)
    summary = asyncio.run(asyncio.wait_for(runner.run(), 300))
    assert removal, "the first server finished no item before the second finished them all"
    removal[0].join(60)
    assert summary["done"] == 8 and summary["failed"] == 0 and summary["left"] == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(collections.Counter(r["item"] for r in records).values()) == [1] * 8
    assert all(r["status"] == "done" for r in records)
    outputs = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert outputs == sorted(rel for r in records for rel in r["outputs"]) and len(outputs) == 16
    by_server = {s["server"]: s for s in summary["servers"]}
    assert by_server["ray:batch/0"]["requeued"] >= 1 and by_server["ray:batch/0"]["went_down"] == 1
    assert any(e["event"] == "item_retry" and e["server"] == "ray:batch/0" for e in events)
    assert digest_tree(folder) == before
    assert sum(pool.node_counts().values()) == 8 and len(pool.node_counts()) == 2
    assert not server_answers(victim.where["url"], within=15), "the lost node's ComfyUI outlived its actor"


def server_answers(url: str, within: float) -> bool:
    """Whether the server still answers after ``within`` seconds of trying to see it gone."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/system_stats", timeout=2):
                pass
        except OSError:
            return False
        time.sleep(0.5)
    return True


def test_batch_cli_with_ray_joins_the_cluster_and_attaches_to_servers(cluster, tmp_path):
    """``python -m client batch ... --ray ADDRESS --server URL``: another driver process joins the cluster, one
    actor attaches to the server, and the summary names the Ray node that did the work."""
    alive = next(w for w in cluster["pool"].workers if w.where["node_id"] in {
        n.node_id for n in cluster["nodes"] if n in cluster["cluster"].worker_nodes})
    folder = picture_folder(tmp_path / "in", 2)
    done = subprocess.run([sys.executable, "-m", "client", "batch", "ben2_remove_background", "--input", folder,
                           "--out", tmp_path / "out", "--server", alive.where["url"], "--set", "3.resolution=128",
                           "--ray", cluster["cluster"].address, "--json"], cwd=ROOT, env=client_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["done"] == 2 and sum(summary["ray"]["nodes"].values()) == 2
