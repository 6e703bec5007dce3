"""The factory's stages and their manifests: ingest → decompose → generate → export → qa.

Layout under ``outputs`` (the config's ``outputs``)::

    manifests/<stage>.jsonl     one line per finished item (the client's append-only Manifest)
    staging/decompose/<category>/<id>/layer_<k>.png, mask_<k>.png
    staging/generate/<category>/<id>/<k>_edit.png, <k>_mask.png
    staging/comfy/...           raw downloads from ComfyUI (server mode)
    dataset/                    see export.py
    reports/qa/report.json, report.html, thumbs/

Every file is written atomically (temporary file, then ``os.replace``) under a name fixed by the item
(``layer_<k>.png``, ``<k>_edit.png``, ...) before its manifest line is appended, so after a kill at any
point a stage's manifest lists only items whose files are complete, and the next run redoes the rest,
overwriting rather than adding files. When a stage ends, files in its staging folder that no current
record lists (left by a kill between writing and recording, or by a sample that is gone) are removed:
each output then exists once and is listed by its stage's manifest. A stage skips an item whose manifest record is ``done`` with the
same fingerprint (source checksum and the settings that shape the item). Source folders are only
read. In server mode the decomposition and the edits run as ComfyUI prompts through the client's
batch runner (several servers, requeue when one dies, retries); every endpoint is health-checked
first (EditKit's nodes and the workflow's model files present) and the run stops early if one is
not ready.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..batch import BatchRunner, Item
from ..comfy import ComfyServer, Timeouts
from ..errors import ClientError
from ..files import atomic_write, clear_partials
from ..manifest import Manifest
from ..validate import find_problems
from ..workflow import apply_overrides, load_workflow, split_target
from . import export as export_stage
from . import imaging, mock, qa
from .ingest import Issue, Sample, ingest

log = logging.getLogger("editkit.dataset")


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


class Factory:
    """One configured run of the factory; each ``stage_*`` method is resumable on its own."""

    def __init__(self, config: dict, mock_mode: bool, progress=None):
        self.config = config
        self.mock = mock_mode
        self.out = Path(config["outputs"])
        self.manifests = self.out / "manifests"
        self.staging = self.out / "staging"
        self.progress = progress or (lambda stage, done, total: None)
        self.timings: dict[str, dict] = {}
        self.ray_nodes: dict[str, dict] = {}  # service → items per Ray node (when the ray: section is set)

    def manifest(self, stage: str) -> Manifest:
        return Manifest(self.manifests / f"{stage}.jsonl")

    def _write(self, path: Path, array: np.ndarray) -> Path:
        return atomic_write(path, imaging.png_bytes(array), self.out)

    # -- ingest ---------------------------------------------------------------------------------

    def stage_ingest(self) -> tuple[list[Sample], list[Issue]]:
        samples, issues = ingest(self.config)
        manifest = self.manifest("ingest")
        known = manifest.load()
        for sample in samples:
            record = sample.record()
            if known.get(sample.id) != json.loads(json.dumps(record, ensure_ascii=False)):
                manifest.append(record)
        atomic_write(self.manifests / "ingest_issues.json",
                     json.dumps([i.__dict__ for i in issues], ensure_ascii=False, indent=1).encode("utf-8"), self.out)
        return samples, issues

    # -- decompose ------------------------------------------------------------------------------

    def _decompose_key(self, sample: Sample) -> str:
        d = self.config["decompose"]
        return _fingerprint(sample.sha256, d["layers"], d["resolution"], d["steps"], d["seed"], d["workflow"],
                            d["overrides"], self.mock)

    def stage_decompose(self, samples: list[Sample]) -> dict[str, dict]:
        if not self.config["decompose"]["enabled"]:
            return {}
        manifest = self.manifest("decompose")
        done = {k: v for k, v in manifest.load().items() if v.get("status") == "done"}
        todo = [s for s in samples if done.get(s.id, {}).get("fingerprint") != self._decompose_key(s)]
        if todo and not self.mock:
            self._decompose_on_servers(todo, manifest)
            for index in range(len(todo)):
                self.progress("decompose", index + 1, len(todo))
        if todo and self.mock:
            count = int(self.config["decompose"]["layers"])
            results = self._mock_map("layered", mock.decompose, len(todo),
                                     lambda i: (imaging.load_rgb(Path(todo[i].path)), count))
            for done_count, (index, layers) in enumerate(results, 1):
                manifest.append(self._store_layers(todo[index], layers))
                self.progress("decompose", done_count, len(todo))
        done = {k: v for k, v in manifest.load().items() if v.get("status") == "done"}
        self._sweep(self.staging / "decompose", [f for r in done.values() for layer in r["layers"] for f in layer.values()])
        return done

    @staticmethod
    def _sweep(folder: Path, listed: list) -> None:
        """Remove files under ``folder`` that no current record lists, then empty folders."""
        keep = {os.path.abspath(str(f)) for f in listed if f}
        if not folder.is_dir():
            return
        for dirpath, _, filenames in os.walk(folder, topdown=False):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if os.path.abspath(path) not in keep:
                    os.unlink(path)
            if dirpath != str(folder) and not os.listdir(dirpath):
                os.rmdir(dirpath)

    def _store_layers(self, sample: Sample, layers: list[np.ndarray]) -> dict:
        folder = self.staging / "decompose" / sample.category / sample.id
        files = []
        for k, layer in enumerate(layers):
            files.append({"layer": str(self._write(folder / f"layer_{k}.png", layer)),
                          "mask": str(self._write(folder / f"mask_{k}.png", layer[..., 3]))})
        return {"item": sample.id, "status": "done", "fingerprint": self._decompose_key(sample), "layers": files,
                "category": sample.category}

    def _decompose_on_servers(self, todo: list[Sample], manifest: Manifest) -> None:
        d = self.config["decompose"]
        targets = d["targets"]
        sets = {target: d[name] for name, target in targets.items() if name != "image" and target}
        items = [Item(key=s.id, input=s.path, picture=Path(s.path), sets=dict(sets, **d["overrides"]),
                      subdir=Path(s.category) / s.id, stem=s.id) for s in todo]
        records = self._run_batch("layered", d["workflow"], items, targets.get("image") or None)
        by_id = {s.id: s for s in todo}
        for key, record in records.items():
            if key not in by_id:
                continue
            if record.get("status") != "done":
                manifest.append({"item": key, "status": "failed", "error": record.get("error")})
                continue
            raw = self.staging / "comfy" / "layered"
            layers = [self._rgba(raw / rel) for rel in record["outputs"]]  # node order, then picture order
            manifest.append(self._store_layers(by_id[key], layers))

    @staticmethod
    def _rgba(path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGBA"), dtype=np.float32) / 255.0

    # -- generate -------------------------------------------------------------------------------

    def _mask_for(self, sample: Sample, layers: dict[str, dict], shape) -> np.ndarray | None:
        mode = self.config["generate"]["mask"]
        if mode == "none":
            return None
        if mode == "decomposition":
            record = layers.get(sample.id)
            if record is None:
                return None
            chosen = record["layers"][int(self.config["generate"]["mask_layer"])]
            return imaging.load_mask(Path(chosen["mask"]))
        # ben2: the mock stands in with a centred ellipse (a "subject"); servers compute it in the workflow.
        h, w = shape
        yy, xx = np.mgrid[0:h, 0:w]
        return (((yy - h / 2) / (h * 0.35)) ** 2 + ((xx - w / 2) / (w * 0.3)) ** 2 <= 1.0).astype(np.float32)

    def _generate_key(self, sample: Sample, k: int, instruction: str) -> str:
        g = self.config["generate"]
        return _fingerprint(sample.sha256, instruction, g["workflow"], g["mask"], g["mask_layer"], g["seed"],
                            g["overrides"], self.mock, self.config["decompose"]["enabled"])

    def stage_generate(self, samples: list[Sample], layers: dict[str, dict]) -> dict[str, dict]:
        manifest = self.manifest("generate")
        done = {k: v for k, v in manifest.load().items() if v.get("status") == "done"}
        jobs = []
        for sample in samples:
            for k, instruction in enumerate(sample.instructions):
                key = f"{sample.id}#{k}"
                if done.get(key, {}).get("fingerprint") != self._generate_key(sample, k, instruction):
                    jobs.append((key, sample, k, instruction))
        if jobs and not self.mock:
            self._generate_on_servers(jobs, layers, manifest)
        else:
            inputs: dict[int, tuple] = {}  # the source and mask of each edit in flight

            def args_for(index):
                _, sample, _, instruction = jobs[index]
                source = imaging.load_rgb(Path(sample.path))
                mask = self._mask_for(sample, layers, source.shape[:2])
                inputs[index] = source, mask
                return source, mask if mask is not None else np.ones(source.shape[:2], np.float32), sample.id, \
                    instruction

            for done_count, (index, edited) in enumerate(self._mock_map("edit", mock.edit, len(jobs), args_for), 1):
                key, sample, k, instruction = jobs[index]
                source, mask = inputs.pop(index)
                manifest.append(self._store_edit(key, sample, k, instruction, source, edited, mask))
                self.progress("generate", done_count, len(jobs))
        done = {k: v for k, v in manifest.load().items() if v.get("status") == "done"}
        self._sweep(self.staging / "generate", [f for r in done.values() for f in (r["edit"], r["mask"])])
        return done

    def _store_edit(self, key, sample: Sample, k: int, instruction: str, source, edited, mask) -> dict:
        folder = self.staging / "generate" / sample.category / sample.id
        edit_path = self._write(folder / f"{k}_edit.png", edited)
        mask_path = self._write(folder / f"{k}_mask.png", mask) if mask is not None else None
        checks = qa.check_pair(source, edited, mask, self.config["qa"])
        return {"item": key, "status": "done", "fingerprint": self._generate_key(sample, k, instruction),
                "id": sample.id, "category": sample.category, "instruction": instruction, "source": sample.path,
                "edit": str(edit_path), "mask": str(mask_path) if mask_path else None, "checks": checks,
                "passed": all(c["ok"] for c in checks.values())}

    def _generate_on_servers(self, jobs, layers: dict[str, dict], manifest: Manifest) -> None:
        g = self.config["generate"]
        targets = g["targets"]
        items, meta = [], {}
        inputs_dir = self.staging / "generate_inputs"  # the pictures sent, with the mask as alpha: removed after
        shutil.rmtree(inputs_dir, ignore_errors=True)
        for key, sample, k, instruction in jobs:
            source = imaging.load_rgb(Path(sample.path))
            mask = self._mask_for(sample, layers, source.shape[:2]) if g["mask"] == "decomposition" else None
            picture = Path(sample.path)
            if mask is not None:  # LoadImage's MASK is 1 - alpha: carry the edit mask in the alpha channel
                rgba = np.concatenate([source, (1.0 - mask)[..., None]], axis=-1)
                picture = self._write(inputs_dir / sample.category / f"{sample.id}_{k}.png", rgba)
            sets = dict(g["overrides"])
            if targets.get("instruction"):
                sets[targets["instruction"]] = instruction
            if targets.get("seed"):
                sets[targets["seed"]] = int(g["seed"]) + k
            items.append(Item(key=key, input=sample.path, picture=picture, sets=sets,
                              subdir=Path(sample.category) / sample.id, stem=f"{sample.id}_{k}"))
            meta[key] = (sample, k, instruction, source, mask)
        try:
            records = self._run_batch("edit", g["workflow"], items, targets.get("image") or None)
        finally:
            shutil.rmtree(inputs_dir, ignore_errors=True)
        raw = self.staging / "comfy" / "edit"
        for key, record in records.items():
            if key not in meta:
                continue
            if record.get("status") != "done" or not record.get("outputs"):
                manifest.append({"item": key, "status": "failed", "error": record.get("error") or "no output"})
                continue
            sample, k, instruction, source, mask = meta[key]
            edited = imaging.load_rgb(raw / record["outputs"][0])
            manifest.append(self._store_edit(key, sample, k, instruction, source, edited, mask))

    def _mock_map(self, service: str, fn, count: int, args_for):
        """``(index, fn(*args_for(index)))`` for each item: here in order, or, with the ``ray:`` section set, as Ray
        tasks spread over the cluster (the pool's CPU and resource request), so ``--mock`` rehearses a cluster."""
        if not self.config["ray"]["address"]:
            for index in range(count):
                yield index, fn(*args_for(index))
            return
        from ..ray_workers import POOL_DEFAULTS, connect, map_on_cluster

        ray = self.config["ray"]
        connect(ray["address"], ray["runtime_env"])
        spec = {**POOL_DEFAULTS, **(ray["pools"].get(service) or {})}
        nodes = self.ray_nodes.setdefault(service, {})
        for index, result, node in map_on_cluster(fn, count, args_for, spec):
            nodes[node] = nodes.get(node, 0) + 1
            yield index, result

    # -- servers --------------------------------------------------------------------------------

    def _run_batch(self, service: str, workflow_name: str, items: list[Item], image_ref) -> dict[str, dict]:
        urls = self.config["services"][service]["endpoint"]
        on_ray = bool(self.config["ray"]["address"])
        if not urls and not (on_ray and self.config["ray"]["pools"].get(service)):
            raise ClientError(f"services.{service}.endpoint is empty: give one or more ComfyUI URLs"
                              f"{f', or ray.pools.{service}' if on_ray else ''}, or use --mock")
        workflow = load_workflow(workflow_name)
        if items:  # a target that does not exist in the workflow is a config error, not N failed items
            try:
                apply_overrides(workflow, [(*split_target(t), v) for t, v in items[0].sets.items()])
            except ClientError as exc:
                section = "decompose" if service == "layered" else "generate"
                raise ClientError(f"{section}.targets/overrides do not fit the workflow '{workflow_name}': {exc}") from exc
        timeouts = Timeouts(stall=float(self.config["services"][service]["timeout"]))
        in_flight = int(self.config["services"]["in_flight"])
        pool = None
        if on_ray:
            pool, in_flight = self._ray_pool(service, urls, timeouts)
            checks = [(w.name, _ray_object_info(w)) for w in pool.workers]
        else:
            checks = [(url, _server_object_info(url, timeouts)) for url in urls]
        out_dir = self.staging / "comfy" / service
        try:
            asyncio.run(health_check(checks, workflow, service))
            runner = BatchRunner(workflow_name=workflow_name, workflow=workflow, items=items, urls=urls,
                                 workers=pool.workers if pool else None, out_dir=out_dir,
                                 manifest_path=self.manifests / f"comfy_{service}.jsonl", image_ref=image_ref,
                                 in_flight=in_flight, max_failures=int(self.config["services"]["max_failures"]),
                                 timeouts=timeouts, progress=False)
            asyncio.run(runner.run())
        finally:
            if pool is not None:
                self.ray_nodes[service] = pool.node_counts()
                pool.stop()
        return runner.manifest.load()

    def _ray_pool(self, service: str, urls: list[str], timeouts: Timeouts):
        """The service's actor pool (its own resource request), or one actor attached to each endpoint URL."""
        from ..ray_workers import RayPool, connect, pool_spec

        ray = self.config["ray"]
        spec = pool_spec(f"{service}", ray["pools"].get(service) or {"urls": urls})
        dashboard = connect(ray["address"], ray["runtime_env"])
        if dashboard:
            log.warning("Ray dashboard: %s", dashboard)
        return RayPool(service, spec, timeouts), int(spec["in_flight"])

    # -- export and qa --------------------------------------------------------------------------

    def stage_export(self, pairs: dict[str, dict]) -> dict:
        export_stage.recover(self.out)
        include_failed = bool(self.config["export"]["include_failed"])
        chosen = [p for _, p in sorted(pairs.items()) if include_failed or p["passed"]]
        fingerprint = _fingerprint([(p["item"], p["fingerprint"]) for p in chosen], self.config["export"])
        manifest = self.manifest("export")
        last = manifest.load().get("export")
        if last and last.get("fingerprint") == fingerprint and (self.out / "dataset").is_dir():
            return last
        counts = export_stage.build(chosen, self.out, self.config["export"])
        record = {"item": "export", "status": "done", "fingerprint": fingerprint, "pairs": len(chosen), **counts}
        manifest.append(record)
        return record

    def stage_qa(self, samples: list[Sample], issues: list[Issue], pairs: dict[str, dict]) -> dict:
        q = self.config["qa"]
        hashes = {s.id: imaging.phash(imaging.load_rgb(Path(s.path))) for s in samples}
        groups = qa.duplicates(hashes, int(q["duplicate_distance"]))
        rows = [{"pair": key, "id": p["id"], "category": p["category"], "instruction": p["instruction"],
                 "source": p["source"], "mask": p["mask"], "edit": p["edit"], "checks": p["checks"]}
                for key, p in sorted(pairs.items())]
        failed = {c: sum(1 for r in rows if not r["checks"][c]["ok"]) for c in qa.PAIR_CHECKS}
        summary = {"samples": len(samples), "pairs": len(rows), "pairs_passed": sum(1 for p in pairs.values()
                                                                                     if p["passed"]),
                   **{f"failed_{c}": n for c, n in failed.items()}, "ingest_issues": len(issues),
                   "duplicate_groups": len(groups)}
        for check in sorted({i.check for i in issues}):
            summary[f"issue_{check}"] = sum(1 for i in issues if i.check == check)
        report = {"summary": summary, "pairs": rows, "issues": [i.__dict__ for i in issues], "duplicates": groups,
                  "thresholds": q}
        json_path, html_path = qa.write_reports(self.out / "reports" / "qa", report, rows, int(q["thumbnail"]))
        self.manifest("qa").append({"item": "qa", "status": "done", "summary": summary, "json": str(json_path),
                                    "html": str(html_path)})
        return report

    def run(self, stages: list[str]) -> dict:
        results: dict = {}
        clear_partials(self.out)  # leftovers of a killed run: never complete files
        t = time.perf_counter()
        samples, issues = self.stage_ingest()
        self.timings["ingest"] = {"seconds": time.perf_counter() - t, "items": len(samples)}
        layers: dict[str, dict] = {}
        pairs: dict[str, dict] = {}
        if "decompose" in stages or "generate" in stages:
            t = time.perf_counter()
            layers = self.stage_decompose(samples) if "decompose" in stages else {
                k: v for k, v in self.manifest("decompose").load().items() if v.get("status") == "done"}
            self.timings["decompose"] = {"seconds": time.perf_counter() - t, "items": len(layers)}
        if "generate" in stages:
            t = time.perf_counter()
            pairs = self.stage_generate(samples, layers)
            self.timings["generate"] = {"seconds": time.perf_counter() - t, "items": len(pairs)}
        else:
            pairs = {k: v for k, v in self.manifest("generate").load().items() if v.get("status") == "done"}
        known = {s.id for s in samples}
        pairs = {k: v for k, v in pairs.items() if v["id"] in known}
        if "export" in stages:
            t = time.perf_counter()
            results["export"] = self.stage_export(pairs)
            self.timings["export"] = {"seconds": time.perf_counter() - t, "items": results["export"]["pairs"]}
        if "qa" in stages:
            t = time.perf_counter()
            results["qa"] = self.stage_qa(samples, issues, pairs)["summary"]
            self.timings["qa"] = {"seconds": time.perf_counter() - t, "items": len(pairs)}
        results["timings"] = self.timings
        if self.ray_nodes:
            results["ray_nodes"] = self.ray_nodes
        return results


async def _server_object_info(url: str, timeouts: Timeouts) -> dict:
    server = ComfyServer(url, timeouts)
    try:
        await server.start()
        return await server.object_info()
    finally:
        await server.close()


async def _ray_object_info(worker) -> dict:
    await worker.probe()  # waits for the actor's own ComfyUI to start
    return await worker.object_info()


async def health_check(checks: list, workflow: dict, service: str) -> None:
    """Every endpoint (name, coroutine giving its ``/object_info``) answers and has the workflow's nodes and model
    files; otherwise stop with the reasons."""
    problems = []
    for name, object_info in checks:
        try:
            found = find_problems(workflow, await object_info)
            problems += [f"{name}: {p.text}" for p in found if p.input != "image"]  # pictures are uploaded per item
        except Exception as exc:  # any failure to talk to it means "not ready"
            problems.append(f"{name}: not reachable ({type(exc).__name__}: {exc})")
    if problems:
        raise ClientError(f"services.{service} is not ready:\n  " + "\n  ".join(problems))
