"""The HTTP API (``serve``) in front of fake ComfyUI servers: endpoints, errors, limits, token, config checks."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from client_helpers import client_env, png_bytes
from fake_comfy import free_port
from PIL import Image

from client.comfy import Timeouts
from client.experiments import DEFAULT_FILE, ExperimentsError, load_experiments
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
    first = body["experiments"][0]
    assert (first["id"], first["name"]) == ("ben2_flux_fill", "BEN2 + FLUX.1 Fill") and first["description"]
    assert [(f["id"], f["name"]) for f in first["features"]] == [
        ("inpainting", "New background (inpainting)"), ("outpainting", "Extend the picture (outpainting)")]
    qwen = body["experiments"][1]
    assert {"id", "name", "description", "features"} <= set(qwen) and qwen["id"] == "ben2_qwen_image"
    assert [f["id"] for f in qwen["features"]] == ["appearance", "semantic", "text", "multi_image"]
    klein = body["experiments"][2]
    assert (klein["id"], klein["name"]) == ("ben2_flux2_klein", "BEN2 + FLUX.2 [klein]")
    assert [f["id"] for f in klein["features"]] == ["background", "instruction", "multi_reference"]
    assert len(body["experiments"]) == 3


def test_experiments_list_carries_what_a_page_needs(fake):
    """Per feature: how many pictures, whether a cut-out comes back, the parameters it takes with the workflow's values
    as defaults, and the recommended ranges from experiments.yaml (the guide's; README's Qwen table)."""
    async def requests(client):
        response = await client.get("/api/image_editing/experiments")
        return await response.json()
    features = {(e["id"], f["id"]): f for e in call([fake.url], requests)["experiments"] for f in e["features"]}
    inpaint = features[("ben2_flux_fill", "inpainting")]
    assert (inpaint["pictures"], inpaint["cutout"]) == (1, True)
    assert inpaint["recommended"] == {"steps": {"min": 10, "max": 50, "default": 28},
                                      "guidance_scale": {"min": 1.0, "max": 15.0, "default": 3.5},
                                      "strength": {"min": 0.0, "max": 1.0, "default": 0.8}}
    assert set(inpaint["parameters"]) == {"prompt", "steps", "guidance_scale", "strength", "seed"}
    outpaint = features[("ben2_flux_fill", "outpainting")]
    assert outpaint["cutout"] is False and outpaint["parameters"]["extend_left"] == 128
    assert outpaint["parameters"]["extend_top"] == 0
    multi = features[("ben2_qwen_image", "multi_image")]
    assert multi["pictures"] == 3 and multi["recommended"]["steps"] == {"min": 28, "max": 35, "default": 30}
    assert features[("ben2_qwen_image", "appearance")]["recommended"]["guidance_scale"]["max"] == 4.0


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
    prompt = next(iter(fake.prompts.values()))
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
    prompt = next(iter(fake.prompts.values()))
    inputs = prompt[node]["inputs"]
    assert prompt[node]["class_type"] == "EditKitQwenImageEdit"
    assert (inputs["prompt"], inputs["steps"], inputs["true_cfg_scale"], inputs["denoise"],
            inputs["negative_prompt"]) == ("change the blue tracksuit to red", 3, 5.0, 0.8, "blurry")
    assert (body["background_removed_image_base64"] is not None) == (feature == "appearance")


@pytest.mark.parametrize("feature, node, cutout", [("background", "6", True), ("instruction", "4", False)])
def test_flux2_klein_features_route_the_request_into_their_workflows(fake, feature, node, cutout):
    async def requests(client):
        response = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_flux2_klein", "feature_id": feature, "input_image_base64": PICTURE,
            "prompt": "a sunny beach", "steps": 3, "guidance_scale": 1.0, "seed": 11, "negative_prompt": "blurry"})
        return response.status, await response.json()
    status, body = call([fake.url], requests)
    assert status == 200 and body["success"] is True, body
    assert body["experiment_name"] == "BEN2 + FLUX.2 [klein]"
    prompt = next(iter(fake.prompts.values()))
    inputs = prompt[node]["inputs"]
    assert prompt[node]["class_type"] in ("EditKitFlux2Inpaint", "EditKitFlux2Sampler")
    assert (inputs["steps"], inputs["cfg"], inputs["seed"]) == (3, 1.0, 11)
    assert (prompt["2"]["inputs"]["prompt"], prompt["2"]["inputs"]["negative_prompt"]) == ("a sunny beach", "blurry")
    assert (body["background_removed_image_base64"] is not None) == cutout


def test_edit_outpainting_has_no_cutout(fake):
    async def requests(client):
        response = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_flux_fill", "feature_id": "outpainting", "input_image_base64": PICTURE,
            "prompt": "hills", "steps": 1})
        return response.status, await response.json()
    status, body = call([fake.url], requests)
    assert status == 200 and body["background_removed_image_base64"] is None and body["output_image_base64"], body


@pytest.mark.parametrize(("payload", "status", "message"), [
    ({"experiment_id": "nope", "input_image_base64": PICTURE}, 404, "unknown experiment_id 'nope' (known: ben2_flux_fill, ben2_qwen_image, ben2_flux2_klein)"),
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
    assert s1 == 200 and b1["success"] and decode(b1["image_base64"]).size == (32, 32), b1
    assert s2 == 200 and b2["success"], b2
    first = next(iter(fake.prompts.values()))
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
    prompts = list(fake.prompts.values())
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
    from fake_comfy import FakeComfy, minimal_object_info
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


# -- requests cost what they return and stop when abandoned (issue 18, item 3) ---------------------------------

def test_generate_renders_num_images_and_returns_all(fake):
    async def requests(client):
        one = await client.post("/generate", json={"mode": "redux", "input_image": PICTURE})
        three = await client.post("/generate", json={"mode": "redux", "input_image": PICTURE, "num_images": 3})
        return [(r.status, await r.json()) for r in (one, three)]
    (s1, b1), (s3, b3) = call([fake.url], requests)
    assert s1 == 200 and len(b1["images_base64"]) == 1 and b1["image_base64"] == b1["images_base64"][0]
    assert s3 == 200 and len(b3["images_base64"]) == 3
    batch_sizes = [next(n["inputs"]["batch_size"] for n in p.values() if "batch_size" in n["inputs"])
                   for p in fake.prompts.values()]
    assert batch_sizes == [1, 3]  # ComfyUI renders what is returned, no more


def test_no_files_are_left_in_comfyui_unless_keep_files(fake):
    """The request's picture travels in the prompt (EditKit's base64 loader) and the answer's pictures come back
    over the WebSocket: nothing is uploaded to ComfyUI's input/ or saved to its output/ or temp/, and the history
    entry (which holds the picture) is deleted. --keep-files runs the workflow as written."""
    payload = {"experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "prompt": "a gym", "steps": 2}

    async def requests(client):
        response = await client.post("/api/edit_with_comfyui", json=payload)
        return response.status, await response.json()
    status, body = call([fake.url], requests)
    assert status == 200, body
    assert decode(body["output_image_base64"]).getpixel((0, 0))[:3] == (5, 245, 245)
    assert decode(body["background_removed_image_base64"]).size == (32, 32)
    assert fake.uploads == {} and fake.files == {}
    posted = next(iter(fake.prompts.values()))
    assert posted["2"]["class_type"] == "EditKitLoadImageBase64" and posted["2"]["inputs"]["data"] == PICTURE
    outputs = sorted(n["class_type"] for n in posted.values() if n["class_type"] in ("SaveImage", "PreviewImage",
                                                                                       "SaveImageWebsocket"))
    assert outputs == ["SaveImageWebsocket", "SaveImageWebsocket"]  # the answer and the cut-out; the mask save is gone
    assert fake.history_deleted == list(fake.prompts) and fake.history == {}
    status, body = call([fake.url], requests, limits=Limits(keep_files=True))
    assert status == 200 and len(fake.uploads) == 1 and len(fake.files) >= 2


def test_pictures_without_frame_metadata_are_matched_to_their_node(object_info):
    """A ComfyUI that sends bare picture frames (no prompt/node ids): the client matches them to the node ComfyUI
    said it was executing, so the answer and the cut-out do not swap."""
    from fake_comfy import FakeComfy, Faults

    with FakeComfy(object_info, faults=Faults(ignore_feature_flags=True)) as plain:
        async def requests(client):
            response = await client.post("/api/edit_with_comfyui", json={
                "experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "prompt": "a gym", "steps": 2})
            return response.status, await response.json()
        status, body = call([plain.url], requests)
    assert status == 200, body
    assert decode(body["output_image_base64"]).getpixel((0, 0))[:3] == (5, 245, 245)
    assert decode(body["background_removed_image_base64"]).size == (32, 32)


def test_pictures_sent_after_history_is_written_are_not_lost(object_info):
    """ComfyUI writes a prompt's history as soon as its worker is done, while the WebSocket frames carrying the
    pictures may still wait in its send queue; a poll of /history in that window must not end the wait early."""
    from fake_comfy import FakeComfy, Faults

    with FakeComfy(object_info, faults=Faults(frames_lag=1.0)) as lagging:
        async def requests(client):
            response = await client.post("/generate", json={"mode": "redux", "input_image": PICTURE, "num_images": 2})
            return response.status, await response.json()
        status, body = call([lagging.url], requests)
    assert status == 200 and len(body["images_base64"]) == 2, body


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_abandoned_requests_are_taken_off_the_queue_or_interrupted_only_that_one(object_info):
    """Three callers on one busy server: the one whose prompt waits in the queue gives up, then the one whose prompt
    runs gives up. The first is deleted from the queue, the second interrupted (by its prompt id), and the third
    finishes normally. The real ``python -m client serve`` process is used (its handler cancellation included)."""
    from fake_comfy import FakeComfy, Faults

    slow = FakeComfy(object_info, faults=Faults(node_seconds=0.25)).start()
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "client", "serve", "--port", str(port), "--server", slow.url],
                             cwd=ROOT, env=client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    body = {"experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "prompt": "a gym", "steps": 2}

    async def go():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(base + "/healthz") as answer:
                        if answer.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)

            async def post(timeout):
                try:
                    async with session.post(base + "/api/edit_with_comfyui", json=body,
                                            timeout=aiohttp.ClientTimeout(total=timeout)) as answer:
                        return answer.status
                except asyncio.TimeoutError:
                    return "gave up"
            running = asyncio.create_task(post(2.0))     # runs first, gives up while running
            await asyncio.sleep(0.5)
            queued = asyncio.create_task(post(1.0))      # queued behind it, gives up while waiting
            await asyncio.sleep(0.3)
            patient = asyncio.create_task(post(60.0))    # queued too, waits for its answer
            return await running, await queued, await patient
    try:
        running, queued, patient = asyncio.run(asyncio.wait_for(go(), 90))
        assert (running, queued, patient) == ("gave up", "gave up", 200)
        first, second, third = slow.received
        assert _wait_for(lambda: second in slow.deleted and first in slow.interrupts)
        assert first not in slow.executed and second not in slow.executed and third in slow.executed
        assert third not in slow.interrupts and third not in slow.deleted
        assert first not in slow.history or slow.history[first]["status"]["status_str"] == "error"
    finally:
        serve.kill()
        serve.wait(10)
        slow.stop()


def test_request_over_the_time_limit_answers_504_and_cancels_its_prompt(object_info, tmp_path):
    from fake_comfy import FakeComfy, Faults

    config = yaml.safe_load(DEFAULT_FILE.read_text())
    config["comfyui"]["timeout"] = 0.5
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(config))
    with FakeComfy(object_info, faults=Faults(node_seconds=0.3)) as slow:
        async def requests(client):
            response = await client.post("/api/edit_with_comfyui", json={
                "experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "prompt": "a gym"})
            return response.status, await response.json()
        status, body = call([slow.url], requests, experiments=load_experiments(path))
        assert status == 504 and "comfyui.timeout" in body["error"] and "cancelled" in body["error"]
        assert _wait_for(lambda: slow.received[0] in slow.interrupts)
        assert slow.received[0] not in slow.executed


def test_redux_prompt_is_followed_or_refused_and_model_id_checked(fake, tmp_path):
    """Issue 18, item 3: a prompt goes through the with-prompt workflow (a text encoder configured), or, without
    one configured, is refused with a 400 that says why; a model_id the mode does not serve is refused too."""
    async def with_prompt(client):
        response = await client.post("/generate", json={"mode": "redux", "input_image": PICTURE,
                                                         "prompt": "as a watercolor", "width": 64, "height": 48})
        other_model = await client.post("/generate", json={"mode": "redux", "input_image": PICTURE,
                                                            "model_id": "stabilityai/sdxl"})
        named = await client.post("/generate", json={"mode": "redux", "input_image": PICTURE,
                                                      "model_id": "black-forest-labs/FLUX.1-Redux-dev"})
        return [(r.status, await r.json()) for r in (response, other_model, named)]
    (s1, b1), (s2, b2), (s3, b3) = call([fake.url], with_prompt)
    assert s1 == 200 and b1["success"], b1
    posted = next(iter(fake.prompts.values()))
    encode = [n for n in posted.values() if n["class_type"] == "EditKitFluxTextEncode"]
    assert [n["inputs"]["prompt"] for n in encode] == ["as a watercolor"]
    assert s2 == 400 and "'model_id' 'stabilityai/sdxl' is not served by mode 'redux'" in b2["error"]
    assert "black-forest-labs/FLUX.1-Redux-dev" in b2["error"]
    assert s3 == 200
    config = yaml.safe_load(DEFAULT_FILE.read_text())
    del config["generate"]["redux"]["with_prompt"]
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(config))
    received = len(fake.received)

    async def refused(client):
        response = await client.post("/generate", json={"mode": "redux", "input_image": PICTURE, "prompt": "x"})
        return response.status, await response.json()
    status, body = call([fake.url], refused, experiments=load_experiments(path))
    assert status == 400 and "'prompt' cannot be used" in body["error"] and "no text encoder configured" in body["error"]
    assert "with_prompt" in body["error"] and len(fake.received) == received


# -- bad input: 4xx naming the field and the fix, before anything is queued (issue 18, item 4) ------------------

def test_bad_inputs_name_the_field_and_the_fix_before_anything_is_queued(fake):
    async def requests(client):
        answers = {}
        answers["width"] = await client.post("/generate", json={"mode": "redux", "input_image": PICTURE, "width": 1000})
        answers["not_a_picture"] = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_flux_fill", "input_image_base64": base64.b64encode(b"hello, not a picture").decode()})
        form = FormData()
        form.add_field("mode", "redux")
        form.add_field("input_image", png_bytes(), filename="x.png", content_type="image/png")
        answers["form_to_json"] = await client.post("/generate", data=form)
        form = FormData()
        form.add_field("experiment_id", "ben2_flux_fill")
        form.add_field("input_image_base64", png_bytes(), filename="x.png", content_type="image/png")
        answers["form_to_edit"] = await client.post("/api/edit_with_comfyui", data=form)
        answers["steps"] = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "guidance_scale": 500})
        return {k: (r.status, await r.json()) for k, r in answers.items()}
    answers = call([fake.url], requests)
    status, body = answers["width"]
    assert status == 400 and "'width' must be a multiple of 16" in body["error"] and "use 992 or 1008" in body["error"]
    status, body = answers["not_a_picture"]
    assert status == 400 and "'input_image_base64' is not a picture" in body["error"]
    assert "BytesIO" not in body["error"] and "send the picture file's bytes" in body["error"]
    status, body = answers["form_to_json"]
    assert status == 400 and "send JSON, or post the form to POST /generate/upload" in body["error"]
    status, body = answers["form_to_edit"]
    assert status == 400 and "takes a JSON object" in body["error"] and "base64-encoded" in body["error"]
    status, body = answers["steps"]
    assert status == 400 and "'guidance_scale' must be between 0.0 and 100.0 here" in body["error"]
    assert fake.received == [] and fake.uploads == {}


def test_cors_preflight_and_answers_for_allowed_origins(fake):
    origin = "http://localhost:5173"

    async def requests(client):
        preflight = await client.options("/api/edit_with_comfyui", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization"})
        listed = await client.get("/api/image_editing/experiments",
                                  headers={"Origin": origin, "Authorization": "Bearer t0k"})
        unauthorised = await client.get("/api/image_editing/experiments", headers={"Origin": origin})
        stranger = await client.options("/api/edit_with_comfyui", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        return [(r.status, dict(r.headers), await r.read()) for r in (preflight, listed, unauthorised, stranger)]

    async def go():
        app = build_app(load_experiments(), [fake.url], "t0k", None, FAST, cors_origins=[origin])
        async with TestClient(TestServer(app)) as client:
            return await requests(client)
    preflight, listed, unauthorised, stranger = asyncio.run(go())
    assert preflight[0] == 204 and preflight[1]["Access-Control-Allow-Origin"] == origin
    assert "Authorization" in preflight[1]["Access-Control-Allow-Headers"]
    assert listed[0] == 200 and listed[1]["Access-Control-Allow-Origin"] == origin
    assert unauthorised[0] == 401 and unauthorised[1]["Access-Control-Allow-Origin"] == origin  # the page can read it
    assert stranger[0] == 403 and b"--cors-origin http://evil.example" in stranger[2]
    assert "Access-Control-Allow-Origin" not in stranger[1]


# -- the progress relay (issue 24) ------------------------------------------------------------------------------

async def _read_events(client, request_id, headers=None) -> list[dict]:
    import json

    response = await client.get(f"/api/progress/{request_id}", headers=headers or {})
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    text = (await response.read()).decode("utf-8")
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_progress_relay_streams_a_requests_events_in_order(object_info):
    """A subscriber that comes first sees the whole run: accepted, queued (with the prompt's node count), started,
    each node executing, the sampler's steps, finished and done; one that comes after the end gets the same
    events and its stream ends; a refused request ends its stream with the API's error."""
    from fake_comfy import FakeComfy, Faults

    with FakeComfy(object_info, faults=Faults(node_seconds=0.05, steps=3)) as fake:
        async def requests(client):
            early = asyncio.create_task(_read_events(client, "request-0001"))
            await asyncio.sleep(0.2)
            answer = await client.post("/api/edit_with_comfyui", headers={"X-Request-Id": "request-0001"}, json={
                "experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE, "prompt": "a gym", "steps": 3})
            late = await _read_events(client, "request-0001")
            refused = await client.post("/api/edit_with_comfyui", headers={"X-Request-Id": "request-0002"},
                                        json={"experiment_id": "ben2_flux_fill", "input_image_base64": PICTURE,
                                              "steps": "many"})
            bad_id = await client.get("/api/progress/x")
            return (answer.status, await early, late, refused.status, await _read_events(client, "request-0002"),
                    bad_id.status)
        status, early, late, refused, refused_events, bad_id = call([fake.url], requests)
    assert status == 200 and early == late
    stages = [e["stage"] for e in early]
    assert stages[:3] == ["accepted", "queued", "started"] and stages[-2:] == ["finished", "done"]
    assert [e["seq"] for e in early] == list(range(len(early)))
    posted = next(iter(fake.prompts.values()))
    assert early[1]["nodes"] == len(posted)
    executing = [e["node"] for e in early if e["stage"] == "executing"]
    assert set(executing) == set(posted) and len(executing) == len(posted)
    steps = [(e["value"], e["max"], e["title"]) for e in early if e["stage"] == "progress" and e["node"] == "6"]
    assert steps == [(1, 3, "Repaint the background"), (2, 3, "Repaint the background"),
                     (3, 3, "Repaint the background")]
    assert refused == 400 and [e["stage"] for e in refused_events] == ["accepted", "error"]
    assert refused_events[-1]["status"] == 400 and "'steps' must be a whole number" in refused_events[-1]["error"]
    assert bad_id == 400


def test_page_and_its_files_are_served_and_need_no_token_but_the_api_does(fake):
    async def requests(client):
        page = await client.get("/")
        script = await client.get("/static/app.js")
        style = await client.get("/static/style.css")
        stream = await client.get("/api/progress/request-0003")
        return (page.status, await page.text(), script.status, await script.text(), style.status, stream.status)
    page_status, page, script_status, script, style_status, stream_status = call(
        [fake.url], requests, token="s3cret")
    assert page_status == script_status == style_status == 200
    assert '<script src="static/app.js"' in page and "/api/image_editing/experiments" in script
    assert stream_status == 401


def test_a_new_experiment_reaches_the_page_without_page_changes(fake, tmp_path):
    """The page builds its form from the experiments endpoint only: an experiment added to the experiments file (as
    the FLUX.2 [klein] one will be) is listed with its features, pictures, parameters and ranges, and the page's
    files name no experiment, feature or workflow."""
    config = yaml.safe_load(DEFAULT_FILE.read_text())
    config["experiments"].append({
        "id": "new_model", "name": "A new editing model", "description": "added later", "models": ["New"],
        "features": [{"id": "edit", "name": "Edit", "workflow": "qwen_edit_multi_image",
                      "parameters": {"input_image": "2.image", "input_image_2": "3.image", "prompt": "5.prompt",
                                     "steps": "5.steps"},
                      "recommended": {"steps": {"min": 4, "max": 8, "default": 4}}, "outputs": {"image": "6"}}]})
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))

    async def requests(client):
        response = await client.get("/api/image_editing/experiments")
        return await response.json()
    listed = call([fake.url], requests, experiments=load_experiments(path))["experiments"][-1]
    assert listed["id"] == "new_model" and listed["features"][0]["pictures"] == 2
    assert listed["features"][0]["recommended"] == {"steps": {"min": 4, "max": 8, "default": 4}}
    page = "".join((ROOT / "client" / "web" / name).read_text() for name in ("index.html", "app.js", "style.css"))
    config = yaml.safe_load(DEFAULT_FILE.read_text())
    names = {e["id"] for e in config["experiments"]} | {f["id"] for e in config["experiments"] for f in e["features"]}
    names |= {f["workflow"] for e in config["experiments"] for f in e["features"]}
    assert not [name for name in names if f'"{name}"' in page or f"'{name}'" in page]


def test_extra_pictures_and_outpainting_sides(fake):
    """Multi-picture features take pictures 2, 3 … in extra_images_base64; outpainting takes the sides to add; both
    are refused, naming the field, where they do not apply or do not fit."""
    second = base64.b64encode(png_bytes((0, 0, 250), (24, 24))).decode()
    third = base64.b64encode(png_bytes((0, 250, 0), (20, 20))).decode()

    async def requests(client):
        answers = {}
        answers["multi"] = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_qwen_image", "feature_id": "multi_image", "input_image_base64": PICTURE,
            "extra_images_base64": [second, third], "prompt": "combine", "steps": 2})
        answers["too_many"] = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_qwen_image", "feature_id": "multi_image", "input_image_base64": PICTURE,
            "extra_images_base64": [second, third, second]})
        answers["outpaint"] = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_flux_fill", "feature_id": "outpainting", "input_image_base64": PICTURE,
            "extend_left": 64, "extend_top": 32, "extend_right": 0, "extend_bottom": 16, "steps": 1})
        answers["not_here"] = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_flux_fill", "feature_id": "inpainting", "input_image_base64": PICTURE,
            "extend_left": 64})
        answers["step"] = await client.post("/api/edit_with_comfyui", json={
            "experiment_id": "ben2_flux_fill", "feature_id": "outpainting", "input_image_base64": PICTURE,
            "extend_left": 100})
        return {k: (r.status, await r.json()) for k, r in answers.items()}
    answers = call([fake.url], requests)
    assert answers["multi"][0] == 200, answers["multi"]
    multi, outpaint = list(fake.prompts.values())
    assert [multi[n]["inputs"]["data"] for n in ("2", "3", "4")] == [PICTURE, second, third]
    assert (outpaint["4"]["inputs"]["left"], outpaint["4"]["inputs"]["top"], outpaint["4"]["inputs"]["right"],
            outpaint["4"]["inputs"]["bottom"]) == (64, 32, 0, 16)
    assert answers["too_many"][0] == 400 and "takes 2 besides the first" in answers["too_many"][1]["error"]
    assert answers["not_here"][0] == 400 and "'extend_left' does not apply" in answers["not_here"][1]["error"]
    assert answers["step"][0] == 400 and "'extend_left' must be a multiple of 8" in answers["step"][1]["error"]
