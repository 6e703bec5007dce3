"""The HTTP API (``serve``) in front of fake ComfyUI servers: endpoints, errors, limits, token, config checks."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from client_helpers import client_env, png_bytes
from PIL import Image

from client.comfy import Timeouts
from client.experiments import DEFAULT_FILE, ExperimentsError, load_experiments
from client.fake_comfy import free_port
from client.serve import Limits, build_app

ROOT = Path(__file__).resolve().parents[2]
FAST = Timeouts(connect=2, request=2, poll=0.3, poll_ws_down=0.1, stall=3, heartbeat=1)
PICTURE = base64.b64encode(png_bytes((250, 10, 10), (32, 32))).decode()


def call(urls, requests, experiments=None, token=None, limits=None):
    """Run ``requests(client)`` against the app and return what it returns."""
    async def go():
        app = build_app(experiments or load_experiments(), urls, token, limits, FAST)
        async with TestClient(TestServer(app)) as client:
            return await requests(client)
    return asyncio.run(asyncio.wait_for(go(), 60))


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_experiments_list_has_the_seed_shape(fake):
    async def requests(client):
        response = await client.get("/api/image_editing/experiments")
        return response.status, await response.json()
    status, body = call([fake.url], requests)
    assert status == 200
    assert body["experiments"][0] == {
        "id": "ben2_flux_fill", "name": "BEN2 + FLUX.1 Fill",
        "description": body["experiments"][0]["description"],
        "features": [{"id": "inpainting", "name": "New background (inpainting)"},
                     {"id": "outpainting", "name": "Extend the picture (outpainting)"}]}
    qwen = body["experiments"][1]
    assert set(qwen) == {"id", "name", "description", "features"} and qwen["id"] == "ben2_qwen_image"
    assert [f["id"] for f in qwen["features"]] == ["appearance", "semantic", "text", "multi_image"]
    assert len(body["experiments"]) == 2


def test_edit_returns_output_and_ben2_cutout(fake):
    async def requests(client):
        response = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "prompt": "a gym",
            "steps": 2, "guidance_scale": 30, "strength": 0.9, "negative_prompt": "blurry"})
        return response.status, await response.json()
    status, body = call([fake.url], requests)
    assert status == 200, body
    assert body["success"] is True and body["experiment_name"] == "BEN2 + FLUX.1 Fill"
    assert decode(body["output_image_base64"]).getpixel((0, 0))[:3] == (5, 245, 245)
    assert decode(body["background_removed_image_base64"]).size == (32, 32)
    assert body["elapsed_time"] >= 0
    prompt = next(iter(fake.history.values()))["prompt"][2]
    assert prompt["6"]["inputs"]["steps"] == 2 and prompt["6"]["inputs"]["denoise"] == 0.9
    assert prompt["5"]["inputs"]["prompt"] == "a gym"
    clones = [n for n in prompt.values() if n["class_type"] == "EditKitBEN2RemoveBackground" and not n["inputs"]["invert"]]
    assert len(clones) == 1  # the cut-out comes from a subject-keeping copy of the BEN2 node


@pytest.mark.parametrize("feature, node", [("appearance", "5"), ("semantic", "3"), ("text", "3")])
def test_qwen_features_route_the_request_into_their_workflows(fake, feature, node):
    """(multi_image also loads the workflow's own pictures 2 and 3, which a real ComfyUI has in its input folder
    from EditKit's start-up copy but this fake server does not.)"""
    async def requests(client):
        response = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_qwen_image", "feature_id": feature, "input_image_base64": PICTURE,
            "prompt": "change the blue tracksuit to red", "steps": 3, "guidance_scale": 5.0, "strength": 0.8,
            "negative_prompt": "blurry"})
        return response.status, await response.json()
    status, body = call([fake.url], requests)
    assert status == 200 and body["success"] is True, body
    prompt = next(iter(fake.history.values()))["prompt"][2]
    inputs = prompt[node]["inputs"]
    assert prompt[node]["class_type"] == "EditKitQwenImageEdit"
    assert (inputs["prompt"], inputs["steps"], inputs["true_cfg_scale"], inputs["denoise"],
            inputs["negative_prompt"]) == ("change the blue tracksuit to red", 3, 5.0, 0.8, "blurry")
    assert (body["background_removed_image_base64"] is not None) == (feature == "appearance")


def test_edit_outpainting_has_no_cutout(fake):
    async def requests(client):
        response = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_flux_fill", "feature_id": "outpainting", "input_image_base64": PICTURE,
            "prompt": "hills", "steps": 1})
        return response.status, await response.json()
    status, body = call([fake.url], requests)
    assert status == 200 and body["background_removed_image_base64"] is None and body["output_image_base64"]


@pytest.mark.parametrize(("payload", "status", "message"), [
    ({"experiment_id": "nope", "input_image_base64": PICTURE}, 404, "unknown experiment_id 'nope' (known: ben2_flux_fill, ben2_qwen_image)"),
    ({"experiment_id": "ben2_flux_fill", "input_image_base64": "%%%"}, 400, "'input_image_base64' is not valid base64"),
    ({"experiment_id": "ben2_flux_fill", "input_image_base64": base64.b64encode(b"text").decode()}, 400,
     "is not a picture Pillow can read"),
    ({"experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "stepz": 3}, 400, "unknown field 'stepz'"),
    ({"experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "steps": "many"}, 400, "'steps' must be a whole number"),
    ({"experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "strength": 2}, 400, "'strength' must be between 0 and 1"),
    ({"experiment_id": "ben2_flux_fill", "feature_id": "x", "input_image_base64": PICTURE}, 404, "has no feature 'x'"),
    ({"experiment_id": "ben2_flux_fill"}, 400, "'input_image_base64' is required"),
])
def test_edit_bad_requests(fake, payload, status, message):
    async def requests(client):
        response = await client.post("/api/edit_with_comfyui", json=payload)
        return response.status, await response.json()
    got_status, body = call([fake.url], requests)
    assert got_status == status and body["success"] is False and message in body["error"], body
    assert fake.received == []


def test_edit_node_failure_and_dead_servers(fake):
    async def requests(client):
        failing = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "prompt": "FAIL"})
        return failing.status, await failing.json()
    status, body = call([fake.url], requests)
    assert status == 502 and "node 5 'The new background'" in body["error"] and "Traceback" not in body["error"]
    dead = f"http://127.0.0.1:{free_port()}"

    async def to_dead(client):
        response = await client.post("/api/edit_with_comfyui", json={"experiment_id": "ben2_flux_fill",
                                                                       "input_image_base64": PICTURE})
        return response.status, await response.json()
    status, body = call([dead], to_dead)
    assert status == 503 and "no ComfyUI server answers" in body["error"]
    status, body = call([dead, fake.url], to_dead)  # the dead one is skipped
    assert status == 200 and body["success"]


def test_generate_redux_uses_its_workflow_or_answers_501(fake):
    bundled = (ROOT / "workflows" / "api" / "flux_redux_variations.json").exists()

    async def requests(client):
        json_answer = await client.post("/generate", json={"mode": "redux", "input_image": PICTURE, "seed": 5,
                                                           "num_inference_steps": 2})
        form = FormData()
        form.add_field("mode", "redux")
        form.add_field("input_image", png_bytes(), filename="x.png", content_type="image/png")
        form_answer = await client.post("/generate/upload", data=form)
        other = await client.post("/generate", json={"mode": "txt2img"})
        return [(r.status, await r.json()) for r in (json_answer, form_answer, other)]
    (s1, b1), (s2, b2), (s3, b3) = call([fake.url], requests)
    assert s3 == 400 and "mode 'txt2img' is not supported" in b3["error"]
    if not bundled:
        assert s1 == 501 and "flux_redux_variations" in b1["error"] and b1["success"] is False
        assert s2 == 501 and "flux_redux_variations" in b2["error"]
        return
    assert s1 == 200 and b1["success"] and decode(b1["image_base64"]).size == (16, 16), b1
    assert s2 == 200 and b2["success"], b2
    first = next(iter(fake.history.values()))["prompt"][2]
    sampler = next(n for n in first.values() if n["inputs"].get("steps") is not None)
    assert (sampler["inputs"]["steps"], sampler["inputs"]["seed"], sampler["inputs"]["guidance"]) == (2, 5, 2.5)
    assert sampler["inputs"]["width"] == sampler["inputs"]["height"] == 1024
    base64_inputs = [n["inputs"]["data"] for n in first.values() if n["class_type"] == "EditKitLoadImageBase64"]
    assert base64_inputs == [PICTURE]


def test_generate_runs_a_configured_mode_json_and_multipart(fake, tmp_path):
    config = yaml.safe_load(DEFAULT_FILE.read_text())
    config["generate"] = {"redux": {"workflow": "ben2_flux_fill_background", "parameters": {
        "input_image": "Picture.image", "prompt": "5.prompt", "num_inference_steps": "*.steps", "seed": "*.seed",
        "cfg": "6.guidance"}}}
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(config))

    async def requests(client):
        a = await client.post("/generate", json={"mode": "redux", "input_image": PICTURE, "prompt": "p",
                                                 "num_inference_steps": 3})
        form = FormData()
        for key, value in {"mode": "redux", "prompt": "q", "seed": "7", "cfg": "3.5"}.items():
            form.add_field(key, value)
        form.add_field("input_image", png_bytes((0, 0, 0), (8, 8)), filename="x.png", content_type="image/png")
        b = await client.post("/generate/upload", data=form)
        return [(r.status, await r.json()) for r in (a, b)]
    (s1, b1), (s2, b2) = call([fake.url], requests, experiments=load_experiments(path))
    assert s1 == 200 and b1["success"] and b1["error"] is None and decode(b1["image_base64"]).size == (32, 32)
    assert s2 == 200 and decode(b2["image_base64"]).getpixel((0, 0))[:3] == (255, 255, 255)
    prompts = [h["prompt"][2] for h in fake.history.values()]
    assert prompts[0]["6"]["inputs"]["steps"] == 3 and prompts[0]["6"]["inputs"]["seed"] == 42  # seed default
    assert prompts[1]["6"]["inputs"]["steps"] == 50 and prompts[1]["6"]["inputs"]["seed"] == 7
    assert prompts[1]["6"]["inputs"]["guidance"] == 3.5 and prompts[1]["5"]["inputs"]["prompt"] == "q"


def test_health_ready_token_and_size_limit(fake):
    dead = f"http://127.0.0.1:{free_port()}"

    async def requests(client):
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        no_token = await client.get("/api/image_editing/experiments")
        with_token = await client.get("/api/image_editing/experiments", headers={"Authorization": "Bearer s3cret"})
        too_big = await client.post("/api/edit_with_comfyui", data=b"x" * 5000,
                                    headers={"Authorization": "Bearer s3cret"})
        return [(r.status, await r.json()) for r in (health, ready, no_token, with_token, too_big)]
    results = call([dead, fake.url], requests, token="s3cret", limits=Limits(max_body_bytes=4096))
    assert results[0] == (200, {"status": "ok"})
    assert results[1][0] == 200 and results[1][1]["ready"] is True
    assert [s["answers"] for s in results[1][1]["servers"]] == [False, True]
    assert results[2][0] == 401 and "access token" in results[2][1]["error"]
    assert results[3][0] == 200
    assert results[4][0] == 413 and results[4][1]["success"] is False

    async def not_ready(client):
        response = await client.get("/readyz")
        return response.status, await response.json()
    status, body = call([dead], not_ready)
    assert status == 503 and body["ready"] is False


def test_readyz_needs_editkit_nodes(object_info):
    from client.fake_comfy import FakeComfy, minimal_object_info
    with FakeComfy(minimal_object_info()) as plain:
        async def requests(client):
            response = await client.get("/readyz")
            return response.status, await response.json()
        status, body = call([plain.url], requests)
    assert status == 503 and body["servers"][0]["answers"] and not body["servers"][0]["editkit"]


def test_experiments_file_errors_name_the_entry(tmp_path):
    config = yaml.safe_load(DEFAULT_FILE.read_text())
    bad_workflow = yaml.safe_load(DEFAULT_FILE.read_text())
    bad_workflow["experiments"][0]["features"][1]["workflow"] = "no_such"
    bad_target = config
    bad_target["experiments"][0]["features"][0]["parameters"]["steps"] = "Repaint the background.stepz"
    for data, expected in [(bad_workflow, "experiments[0] (ben2_flux_fill).features[1] (outpainting).workflow: "
                                          "no bundled workflow 'no_such' (bundled: "),
                           (bad_target, "features[0] (inpainting).parameters.steps: target "
                                        "'Repaint the background.stepz' does not fit workflow 'ben2_flux_fill_background'")]:
        path = tmp_path / "e.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ExperimentsError) as info:
            load_experiments(path)
        assert expected in str(info.value)


def test_serve_refuses_other_addresses_without_a_token():
    done = subprocess.run([sys.executable, "-m", "client", "serve", "--host", "0.0.0.0"], cwd=ROOT,
                          env={**client_env(), "EDITKIT_SERVE_TOKEN": ""}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "pass --token TOKEN" in done.stderr
