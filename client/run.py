"""``python -m client run``: one workflow, once, on the first server that answers.

The pieces ``run`` needs: preparing a prompt from a workflow and the ``--set``/``--image`` options,
picking a live server, and saving outputs atomically under names that carry the prompt id
(``<workflow>_<prompt id>_<node>_<n><ext>``, so two runs never write the same file).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import console
from .comfy import ComfyServer, PromptResult, Timeouts
from .errors import ServerUnavailable, WorkflowError
from .files import atomic_write, read_picture, safe_stem
from .workflow import apply_overrides, find_node, load_workflow, parse_assignment


@dataclass
class PictureInput:
    """A picture to upload and wire into a node's ``image`` input."""

    node_ref: str
    path: Path


def parse_image_option(text: str) -> PictureInput:
    node_ref, sep, path = text.partition("=")
    if not sep or not node_ref.strip() or not path.strip():
        raise WorkflowError(f"--image '{text}': expected NODE=PATH (e.g. 2=photo.png or \"Picture=photo.png\")")
    return PictureInput(node_ref.strip(), Path(path.strip()).expanduser())


async def first_live_server(urls: list[str], timeouts: Timeouts, say) -> ComfyServer:
    """The first server of the list that answers ``/system_stats``; the others are reported."""
    problems = []
    for url in urls:
        server = ComfyServer(url, timeouts)
        try:
            await server.system_stats(timeout=timeouts.connect + 5)
            return server
        except ServerUnavailable as exc:
            problems.append(str(exc))
            say(f"skipping: {exc}")
            await server.close()
    raise ServerUnavailable("no ComfyUI server answers:\n  - " + "\n  - ".join(problems))


async def download_outputs(server: ComfyServer, result: PromptResult, out_dir: Path, stem: str,
                           subdir: Path | None = None) -> list[Path]:
    """Fetch every picture output and write it atomically as ``<stem>_<prompt id>_<node>_<n><ext>``."""
    saved = []
    counters: dict[str, int] = {}
    for node_id, ref in result.images():
        data = await server.view(ref)
        counters[node_id] = counters.get(node_id, 0) + 1
        suffix = Path(ref["filename"]).suffix or ".png"
        name = f"{stem}_{result.prompt_id}_{safe_stem(node_id)}_{counters[node_id]}{suffix}"
        target = out_dir / (subdir or Path()) / name
        saved.append(atomic_write(target, data, out_dir))
    return saved


async def prepare_prompt(server: ComfyServer, prompt: dict, sets: list[tuple[str, str, Any]],
                         pictures: list[PictureInput]) -> dict:
    """Apply ``--set`` values and upload ``--image`` pictures (checked to be pictures first)."""
    object_info = await server.object_info()
    prompt = apply_overrides(prompt, sets, object_info)
    for picture in pictures:
        node_id = find_node(prompt, picture.node_ref)
        if "image" not in prompt[node_id]["inputs"]:
            raise WorkflowError(f"--image {picture.node_ref}=...: node {node_id} has no 'image' input "
                                "(pick a LoadImage node)")
        data = read_picture(picture.path)
        prompt[node_id]["inputs"]["image"] = await server.upload_image(data, picture.path.name)
    return prompt


class ProgressView:
    """A node-level progress bar on stderr (tqdm), or JSON event lines on stdout with ``--json``."""

    def __init__(self, prompt: dict, as_json: bool):
        self.as_json = as_json
        self.bar = None
        if not as_json:
            from tqdm import tqdm

            self.bar = tqdm(total=len(prompt), unit="node", file=sys.stderr, leave=False, dynamic_ncols=True)
        self.done_nodes: set[str] = set()

    def __call__(self, event: dict) -> None:
        if self.as_json:
            console.event(event)
            return
        kind = event["event"]
        if kind == "cached":
            self._advance(event["nodes"])
        elif kind in ("executing", "executed"):
            self._advance([event["node"]])
            self.bar.set_description(f"{event.get('title') or event['node']}", refresh=True)
        elif kind == "progress" and event.get("max"):
            self.bar.set_postfix_str(f"step {event['value']}/{event['max']}", refresh=True)
        elif kind == "ws_lost":
            self.bar.write("WebSocket to ComfyUI dropped; reconnecting and polling /history meanwhile")

    def _advance(self, nodes: list) -> None:
        new = [n for n in nodes if n not in self.done_nodes]
        self.done_nodes.update(new)
        self.bar.update(len(new))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run_command(args) -> int:
    """Body of ``python -m client run`` (argparse namespace in, exit status out)."""
    say = _stderr if not args.json else _json_stderr
    timeouts = Timeouts(stall=args.stall_timeout, request=args.request_timeout)
    workflow = load_workflow(args.workflow)
    sets = [parse_assignment(s) for s in args.set or []]
    pictures = [parse_image_option(s) for s in args.image or []]
    for picture in pictures:
        read_picture(picture.path)  # a wrong picture is reported before any server is contacted
    for node_ref, _, _ in sets:
        if node_ref != "*":
            find_node(workflow, node_ref)  # unknown nodes too; inputs are checked with the server's node specs
    server = await first_live_server(args.server or ["http://127.0.0.1:8188"], timeouts, say)
    view = None
    try:
        prompt = await prepare_prompt(server, workflow, sets, pictures)
        view = ProgressView(prompt, args.json)
        # Ctrl-C cancels this task; ComfyServer.run then takes the prompt off ComfyUI's queue
        result = await server.run(prompt, view, check=not args.no_validate)
        view.close()
        stem = safe_stem(Path(args.workflow).stem)
        saved = await download_outputs(server, result, Path(args.out), stem)
        if args.json:
            console.event({"event": "saved", "prompt_id": result.prompt_id, "server": server.url,
                           "files": [str(p) for p in saved]})
        else:
            for path in saved:
                console.out(str(path))
            if not saved:
                say("the workflow finished but produced no pictures")
        return 0
    finally:
        if view is not None:
            view.close()
        await server.close()


def _stderr(text: str) -> None:
    console.err(text)


def _json_stderr(text: str) -> None:
    console.err(json.dumps({"event": "notice", "message": text}, ensure_ascii=False))
