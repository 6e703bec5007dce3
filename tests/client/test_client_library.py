"""The library against the fake ComfyUI: validation, readable errors, uploads, WebSocket drops, hangs, deaths."""

from __future__ import annotations

import asyncio
import time

import pytest
from client_helpers import png_bytes
from fake_comfy import FakeComfy, Faults, free_port

from client.comfy import ComfyServer, Timeouts
from client.errors import (
    ExecutionFailed,
    PromptLost,
    PromptRejected,
    ServerUnavailable,
    ValidationFailed,
    WorkflowError,
    format_execution_error,
)
from client.validate import find_problems
from client.workflow import add_preview, apply_overrides, find_node, load_workflow, parse_assignment

FAST = Timeouts(connect=2, request=2, poll=0.3, poll_ws_down=0.1, stall=3, heartbeat=1)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _run_prompt(url, prompt, picture=None, node="2", events=None, timeouts=FAST):
    async with ComfyServer(url, timeouts) as server:
        if picture is not None:
            prompt[node]["inputs"]["image"] = await server.upload_image(picture, "in.png")
        result = await server.run(prompt, events.append if events is not None else None)
        return result, {nid: await server.view(ref) for nid, ref in result.images()}


def test_validation_names_every_problem_before_queueing(fake, object_info):
    prompt = load_workflow("ben2_flux_fill_background")
    prompt["1"]["inputs"]["model_name"] = "BEN2_Missing.safetensors"      # model file not on the server
    prompt["6"]["inputs"]["image"] = ["3", 1]                            # MASK into an IMAGE input
    del prompt["5"]["inputs"]["prompt"]                                  # required input missing
    prompt["6"]["inputs"]["steps"] = 0                                   # below min
    prompt["8"] = {"class_type": "NoSuchNode", "inputs": {}, "_meta": {"title": "Mystery"}}
    problems = find_problems(prompt, object_info)
    assert [p.text for p in problems] == [
        "node 8 'Mystery' (NoSuchNode): the server has no node class 'NoSuchNode'. Is the custom node pack that "
        "provides it installed (EditKit nodes need this repository in ComfyUI's custom_nodes) and did it import "
        "without errors (look for IMPORT FAILED in ComfyUI's log)?"]
    del prompt["8"]
    texts = [p.text for p in find_problems(prompt, object_info, {"editkit_portrait.png"})]
    assert len(texts) == 4, texts
    assert any("node 1 'Load BEN2 Base'" in t and "'BEN2_Missing.safetensors'" in t and "models folder" in t for t in texts)
    assert any("node 6 'Repaint the background'" in t and "input 'image' expects IMAGE" in t
               and "MASK output of node 3 'Background mask" in t for t in texts)
    assert any("node 5 'The new background'" in t and "required input 'prompt' is missing" in t for t in texts)
    assert any("input 'steps': 0 is smaller than the minimum 1" in t for t in texts)
    with pytest.raises(ValidationFailed):
        run(_run_prompt(fake.url, prompt))
    assert fake.received == []  # nothing was queued


def test_a_prompt_runs_and_outputs_match_the_uploaded_picture(fake):
    prompt = load_workflow("ben2_remove_background")
    events: list = []
    picture = png_bytes((255, 0, 0))
    result, files = run(_run_prompt(fake.url, prompt, picture, events=events))
    assert set(files) == {"4", "6"}
    import io

    from PIL import Image
    with Image.open(io.BytesIO(files["4"])) as out:
        assert out.getpixel((0, 0)) == (0, 255, 255)  # the fake inverts its LoadImage's picture
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "finished"
    assert {"started", "cached", "executing", "executed"} <= set(kinds)
    assert result.prompt_id in fake.executed


def test_uploads_never_overwrite_and_reuse_identical_content(fake):
    async def go():
        async with ComfyServer(fake.url, FAST) as server:
            a = await server.upload_image(png_bytes((1, 2, 3)), "photo.png")
            b = await server.upload_image(png_bytes((1, 2, 3)), "photo.png")
            c = await server.upload_image(png_bytes((9, 9, 9)), "photo.png")
            return a, b, c
    a, b, c = run(go())
    assert a == b and a != c
    assert a.startswith("editkit-") and "photo" in a
    assert len(fake.uploads) == 2


def test_progress_events_name_node_and_step(fake):
    prompt = load_workflow("ben2_flux_fill_background")
    events: list = []
    run(_run_prompt(fake.url, prompt, png_bytes(), events=events))
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[0]["node"] == "6" and progress[0]["title"] == "Repaint the background"
    assert (progress[0]["value"], progress[0]["max"]) == (1, 28)


def test_execution_error_is_readable(fake):
    prompt = load_workflow("ben2_flux_fill_background")
    prompt["5"]["inputs"]["prompt"] = "please FAIL here"
    with pytest.raises(ExecutionFailed) as info:
        run(_run_prompt(fake.url, prompt, png_bytes()))
    text = str(info.value)
    assert text.startswith("node 5 'The new background' (EditKitFluxTextEncode) failed on ComfyUI at http://127.0.0.1:")
    assert "RuntimeError: fake failure requested by input 'prompt'" in text
    assert info.value.node_id == "5"


def test_node_errors_are_readable_when_the_server_refuses(fake):
    fake.faults.reject_with = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                  "details": "", "extra_info": {}},
        "node_errors": {"6": {"errors": [{"type": "value_bigger_than_max", "message": "Value 99 bigger than max of 50",
                                          "details": "steps", "extra_info": {"input_name": "steps"}}],
                              "dependent_outputs": ["7"], "class_type": "EditKitFluxFillInpaint"}}}
    prompt = load_workflow("ben2_flux_fill_background")

    async def go():
        async with ComfyServer(fake.url, FAST) as server:
            prompt["2"]["inputs"]["image"] = await server.upload_image(png_bytes(), "x.png")
            await server.submit(prompt)
    with pytest.raises(PromptRejected) as info:
        run(go())
    assert "refused the prompt: Prompt outputs failed validation" in str(info.value)
    assert "node 6 'Repaint the background' (EditKitFluxFillInpaint): input 'steps': Value 99 bigger than max of 50" \
        in str(info.value)


def test_execution_error_text_uses_last_traceback_line():
    text = format_execution_error({"node_id": "3", "exception_type": "ValueError", "exception_message": "bad size",
                                   "traceback": ["a\n", "  File x.py, line 2\n    boom()\n"]},
                                  {"3": {"class_type": "X", "inputs": {}, "_meta": {"title": "T"}}}, "http://s")
    assert text == "node 3 'T' (X) failed on ComfyUI at http://s: ValueError: bad size\n    (last traceback line: boom())"


def test_websocket_drop_mid_prompt_still_finishes(object_info):
    with FakeComfy(object_info, faults=Faults(drop_ws_after=4, drop_ws_times=3, node_seconds=0.05)) as fake:
        events: list = []
        result, files = run(_run_prompt(fake.url, load_workflow("ben2_remove_background"), png_bytes(), events=events))
        assert set(files) == {"4", "6"}
        assert "ws_lost" in [e["event"] for e in events]
        assert fake.executed == [result.prompt_id]


def test_dead_server_is_reported_as_unavailable():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable) as info:
        run(_run_prompt(url, load_workflow("ben2_remove_background")))
    assert f"ComfyUI at {url} does not answer" in str(info.value)


def test_hung_server_times_out_instead_of_waiting_forever(object_info):
    with FakeComfy(object_info, faults=Faults(node_seconds=0.2)) as fake:
        async def go():
            async with ComfyServer(fake.url, FAST) as server:
                prompt = load_workflow("ben2_remove_background")
                prompt["2"]["inputs"]["image"] = await server.upload_image(png_bytes(), "x.png")
                prompt_id = await server.submit(prompt)
                fake.hang()
                await server.wait(prompt_id, prompt)
        started = time.monotonic()
        with pytest.raises(ServerUnavailable):
            run(go())
        assert time.monotonic() - started < 15


def test_server_that_dies_and_forgets_the_prompt(object_info):
    fake = FakeComfy(object_info, faults=Faults(node_seconds=0.3)).start()
    try:
        async def go():
            async with ComfyServer(fake.url, FAST) as server:
                prompt = load_workflow("ben2_remove_background")
                prompt["2"]["inputs"]["image"] = await server.upload_image(png_bytes(), "x.png")
                prompt_id = await server.submit(prompt)
                await asyncio.to_thread(fake.kill)
                await asyncio.to_thread(fake.revive)  # back, but with an empty queue and history
                await server.wait(prompt_id, prompt)
        with pytest.raises(PromptLost, match="no longer knows prompt"):
            run(go())
    finally:
        fake.stop()


def test_interrupt_and_cancel(object_info):
    with FakeComfy(object_info, faults=Faults(node_seconds=0.3)) as fake:
        async def go():
            async with ComfyServer(fake.url, FAST) as server:
                prompt = load_workflow("ben2_remove_background")
                prompt["2"]["inputs"]["image"] = await server.upload_image(png_bytes(), "x.png")
                first = await server.submit(prompt)
                second = await server.submit(apply_overrides(prompt, [("1", "precision", "fp32")]))
                await asyncio.sleep(0.1)
                await server.cancel(second)
                await server.interrupt(first)
                await server.wait(first, prompt)
        from client.errors import ExecutionInterrupted
        with pytest.raises(ExecutionInterrupted):
            run(go())
        assert len(fake.deleted) == 1 and len(fake.received) == 2 and fake.executed == []


def test_nodes_by_title_and_set_parsing():
    prompt = load_workflow("ben2_flux_fill_background")
    assert find_node(prompt, "Repaint the background") == "6"
    assert find_node(prompt, "repaint THE background") == "6"
    assert parse_assignment("Repaint the background.steps=2") == ("Repaint the background", "steps", 2)
    assert parse_assignment('5.prompt="a.b=c"') == ("5", "prompt", "a.b=c")
    assert parse_assignment("5.prompt=plain text") == ("5", "prompt", "plain text")
    changed = apply_overrides(prompt, [("Repaint the background", "steps", 2), ("*", "seed", 5)])
    assert changed["6"]["inputs"]["steps"] == 2 and changed["6"]["inputs"]["seed"] == 5
    assert prompt["6"]["inputs"]["steps"] == 28  # the original is untouched
    with pytest.raises(WorkflowError, match="no node with id or title 'Nope'"):
        apply_overrides(prompt, [("Nope", "steps", 1)])
    with pytest.raises(WorkflowError, match="has no input 'stepz'. Its inputs: "):
        apply_overrides(prompt, [("6", "stepz", 1)])
    with pytest.raises(WorkflowError, match="is connected to node 4"):
        apply_overrides(prompt, [("6", "model", 1)])


def test_add_preview_clones_with_overrides():
    prompt = load_workflow("ben2_flux_fill_background")
    preview = add_preview(prompt, "3", 0, {"invert": False})
    source = prompt[preview]["inputs"]["images"][0]
    assert source not in ("3",) and prompt[source]["inputs"]["invert"] is False
    assert prompt["3"]["inputs"]["invert"] is True
    assert prompt[source]["inputs"]["ben2_model"] == ["1", 0]
