"""Regenerate the UI-format workflows (``workflows/<name>.json``) from the API-format ones (``workflows/api/``).

    python scripts/export_ui_workflows.py --comfy-root /tmp/ComfyUI --python /tmp/comfy-venv/bin/python \\
        --models /tmp/tiny1
    python scripts/export_ui_workflows.py --url http://127.0.0.1:8188      # a ComfyUI that already runs
    python scripts/export_ui_workflows.py ... --check                      # verify only, write nothing

Why this exists: the pack ships every workflow twice. ``workflows/api/<name>.json`` (API format, what
``POST /prompt`` takes) is hand-written and is the source of truth. ComfyUI's template browser lists every JSON
in the pack's ``workflows/`` folder but opens only the UI (LiteGraph) format, so each API file needs a UI twin.
Writing LiteGraph JSON by hand is error-prone (slot numbers, link tables, hidden widget values), so this tool
lets the real ComfyUI frontend do the conversion: it loads each API file with ``app.loadApiJson(json, name)``
(what the frontend does with a dropped API file), lays the graph out left to right, and writes
``app.graph.serialize()``. It then proves the result the way the template browser will use it: it opens the
written file with ``app.loadGraphData(ui, true, true, name)`` and checks that ``app.graphToPrompt()`` gives back
exactly the API file's prompt. ``tests/test_workflow_formats.py`` keeps the two formats in sync offline.

What the written files contain besides the API values (frontend 1.27.10 behaviour):

* INT widgets with ``control_after_generate`` (and INT inputs named ``seed``/``noise_seed``) get an extra
  widget value after theirs. The frontend defaults it to "randomize"; this tool sets it to "fixed" so the
  template keeps the API file's seed after a run instead of drifting away from its API twin.
* ``LoadImage`` gets an "upload" widget (value "image") and an input slot for it.
* Widget inputs appear in each node's ``inputs`` list too (after all socket inputs), so link target slots
  count them.
* Titles wider than their node are cut short on the canvas; this tool widens such nodes before the layout.
* Each loader node's ``properties.models`` lists the single files it names, with their download URL and
  ComfyUI folder (from ``workflows/notes/models.json``, see ``scripts/workflow_notes.py``): the frontend's
  "missing models" dialog reads it when the template opens.
* ``extra.ds`` (the view the template browser restores) centres the whole graph in a 1600x1000 window at a
  zoom where node text is drawn (``OPEN_VIEW``); the layout puts the Note under the first columns, or wraps a
  long chain into a second row, when only that fits.

Thumbnails (``workflows/<name>.jpg``) are drawn by ``scripts/make_thumbnails.py``, not taken from the graph.

Requirements (a developer tool, not run in CI):

* A ComfyUI checkout (``--comfy-root``) with a Python that has ComfyUI's requirements and this pack's
  (``--python``), or the address of a running ComfyUI that has this pack loaded (``--url``). With
  ``--comfy-root`` the tool starts its own ComfyUI on a free loopback port, loads this repository as the pack
  ``editkit`` through a temporary ``--extra-model-paths-config`` (the checkout is not touched), gives it an input directory of links to
  ``workflows/inputs`` so the image combos list the example pictures (ComfyUI creates folders in its input
  directory, and ``workflows/inputs`` must not change), and stops it afterwards. ``--models DIR`` adds each sub-folder of DIR as a model folder of that name (e.g. the
  tiny tree from ``tests/make_tiny_models.py``) so model combos contain the files the workflows name.
* Chromium (Debian: ``apt-get install -y chromium``), run headless with a throw-away profile. It is driven
  through the Chrome DevTools Protocol with a small standard-library WebSocket client, so no Python package
  beyond the standard library is needed to run this script itself.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workflow_layout  # noqa: E402
import workflow_notes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT / "workflows" / "api"
UI_DIR = ROOT / "workflows"
INPUTS_DIR = ROOT / "workflows" / "inputs"
PACK_NAME = "editkit"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Wide enough that fitting the largest graphs keeps the zoom above the level where the frontend hides
    # text boxes (low-quality rendering).
    "--window-size=2400,1500", "--remote-debugging-port=0",
)
# Value written for every control_after_generate widget (see the module docstring).
CONTROL_VALUE = "fixed"
NOTE_WIDTH = 440
# Node fields that only describe the layout; --check reports differences in them as a note, not as drift.
LAYOUT_FIELDS = ("pos", "size")
# The view a template opens in (saved as the workflow's extra.ds, which the template browser restores): a
# 1600x1000 window with frontend 1.27.10's default UI has its canvas at x 64..1600 (side bar on the left),
# y 78..1000 (tabs and menu bar on top), with the minimap (250x200) and the canvas tool bar over its bottom right
# corner (together 323x266 px). The graph must fit that canvas (less a margin, and clear of that corner) at a
# zoom where the frontend still draws node text: LiteGraph switches to low-quality drawing below 8 px / 14 px
# = 0.571 (LiteGraph.Canvas.MinFontSizeForLOD over NODE_TEXT_SIZE); 0.585 leaves a little room.
# scripts/check_templates_in_browser.py measures all of this again in the real UI.
OPEN_WINDOW = (1600, 1000)
OPEN_CANVAS = (64, 78, 1536, 922)  # x, y, width, height of the canvas in that window
OPEN_VIEW = workflow_layout.View(width=OPEN_CANVAS[2], height=OPEN_CANVAS[3], min_scale=0.585, corner=(324, 268))


class ExportError(RuntimeError):
    """A problem the user has to fix (missing browser, pack not loaded, round trip mismatch)."""


# --------------------------------------------------------------------------------------------------------------
# Minimal WebSocket client (RFC 6455, text frames only): enough for the DevTools protocol, and it keeps the
# tool free of third-party packages.


class WebSocket:
    """A blocking client connection to ``ws://host:port/path``."""

    def __init__(self, url: str, timeout: float):
        parts = urllib.parse.urlsplit(url)
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self._sock.sendall(request.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"{url}: connection closed during the WebSocket handshake")
            data += chunk
        head, self._buffer = data.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 101 " not in status:
            raise ConnectionError(f"{url}: WebSocket handshake refused: {status}")

    def send(self, text: str) -> None:
        payload = text.encode()
        size = len(payload)
        header = bytearray([0x81])  # FIN + text frame
        if size < 126:
            header.append(0x80 | size)
        elif size < 1 << 16:
            header.append(0x80 | 126)
            header += struct.pack(">H", size)
        else:
            header.append(0x80 | 127)
            header += struct.pack(">Q", size)
        mask = os.urandom(4)  # clients must mask every frame
        header += mask
        key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(size, "big") if size else b""
        self._sock.sendall(bytes(header) + masked)

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the browser closed the DevTools connection")
            self._buffer += chunk
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def recv(self) -> str:
        fragments = []
        while True:
            first, second = self._read(2)
            opcode, size = first & 0x0F, second & 0x7F
            if size == 126:
                size = struct.unpack(">H", self._read(2))[0]
            elif size == 127:
                size = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(size)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode in (0x0, 0x1, 0x2):
                fragments.append(payload)
                if first & 0x80:
                    return b"".join(fragments).decode()
            # ping/pong frames carry nothing we need; Chromium does not require answers to them.

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


class DevTools:
    """Chrome DevTools Protocol session on one page: commands, JS evaluation, and collected page errors."""

    def __init__(self, ws: WebSocket):
        self._ws = ws
        self._next_id = 0
        self.errors: list[str] = []

    def call(self, method: str, **params):
        self._next_id += 1
        message_id = self._next_id
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise ExportError(f"DevTools {method} failed: {message['error']}")
                return message["result"]
            self._record(message)

    def _record(self, event: dict) -> None:
        """Keep uncaught page exceptions and console errors, so each step can fail on new ones."""
        params = event.get("params", {})
        if event.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "?"))
        elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))

    def evaluate(self, expression: str):
        """Evaluate JS in the page (awaiting a returned promise) and return its JSON value."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise ExportError(f"page error: {details.get('exception', {}).get('description') or details['text']}")
        return result["result"].get("value")

    def call_js(self, function: str, *args):
        """Call a JS function expression with JSON arguments."""
        return self.evaluate(f"({function})({', '.join(json.dumps(a) for a in args)})")


# --------------------------------------------------------------------------------------------------------------
# ComfyUI and Chromium processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http_json(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback ComfyUI/DevTools
        return json.load(response)


@contextlib.contextmanager
def own_comfyui(comfy_root: Path, python: str, models: Path | None, port: int | None, timeout: float):
    """Start ComfyUI with this repository loaded as the pack ``editkit``; yield its URL; stop it."""
    if not (comfy_root / "main.py").is_file():
        raise ExportError(f"{comfy_root} is not a ComfyUI checkout (no main.py)")
    port = port or _free_port()
    with tempfile.TemporaryDirectory(prefix="editkit-export-") as tmp:
        tmp_path = Path(tmp)
        packs = tmp_path / "custom_nodes"
        packs.mkdir()
        (packs / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
        lines = ["editkit_export:", f"  custom_nodes: {packs}"]
        if models is not None:
            if not models.is_dir():
                raise ExportError(f"--models {models} is not a folder")
            lines += [f"  {d.name}: {d.resolve()}" for d in sorted(models.iterdir()) if d.is_dir()]
        config = tmp_path / "extra_model_paths.yaml"
        config.write_text("\n".join(lines) + "\n")
        for name in ("user", "output", "temp", "input"):
            (tmp_path / name).mkdir()
        # ComfyUI writes into its input directory (e.g. Load3D creates input/3d), and workflows/inputs must
        # stay as committed: give it a folder of links to the example pictures instead of the folder itself.
        for picture in sorted(INPUTS_DIR.iterdir()):
            if picture.is_file():
                (tmp_path / "input" / picture.name).symlink_to(picture)
        log_path = tmp_path / "comfyui.log"
        command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                   "--disable-auto-launch", "--extra-model-paths-config", str(config),
                   "--input-directory", str(tmp_path / "input"), "--user-directory", str(tmp_path / "user"),
                   "--output-directory", str(tmp_path / "output"), "--temp-directory", str(tmp_path / "temp")]
        print(f"starting ComfyUI on port {port} ({python} {comfy_root / 'main.py'})")
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise ExportError(f"ComfyUI exited during startup:\n{_tail(log_path)}")
                try:
                    _http_json(f"{url}/system_stats", timeout=2)
                    break
                except (OSError, ValueError):
                    if time.monotonic() > deadline:
                        raise ExportError(f"ComfyUI not ready after {timeout:.0f} s:\n{_tail(log_path)}") from None
                    time.sleep(0.5)
            failed = [line for line in log_path.read_text().splitlines() if "IMPORT FAILED" in line]
            if failed:
                raise ExportError("a custom node pack failed to import:\n" + "\n".join(failed)
                                  + f"\n{_tail(log_path)}")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def find_chromium(explicit: str | None) -> str:
    """The browser executable, or an ExportError that says how to get one."""
    candidates = [explicit] if explicit else [os.environ.get("CHROMIUM"), *CHROMIUM_NAMES]
    for candidate in filter(None, candidates):
        found = shutil.which(candidate)
        if found:
            return found
    raise ExportError("Chromium not found" + (f" at {explicit}" if explicit else "")
                      + ". Install it (Debian/Ubuntu: apt-get install -y chromium) or pass --chromium PATH. "
                      "It is driven over the DevTools protocol; no Playwright or other driver is needed.")


@contextlib.contextmanager
def chromium_page(executable: str, timeout: float):
    """Start headless Chromium with a fresh profile and yield a DevTools session on its page."""
    profile = tempfile.mkdtemp(prefix="editkit-chromium-")
    log_path = Path(profile) / "chromium.log"
    with open(log_path, "w") as log:
        # Its own process group, so stopping it also stops the renderer and utility processes it started.
        process = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    ws = None
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ExportError(f"Chromium did not start its DevTools endpoint:\n{_tail(log_path)}")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = [t for t in _http_json(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page"]
        if not pages:
            raise ExportError("Chromium started without a page")
        ws = WebSocket(pages[0]["webSocketDebuggerUrl"], timeout=timeout)
        page = DevTools(ws)
        page.call("Runtime.enable")
        page.call("Page.enable")
        yield page
    finally:
        if ws is not None:
            ws.close()
        _stop_group(process)
        # Child processes may still flush files into the profile for a moment after the group is signalled.
        for _attempt in range(50):
            shutil.rmtree(profile, ignore_errors=True)
            if not os.path.exists(profile):
                break
            time.sleep(0.2)


def _stop_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --------------------------------------------------------------------------------------------------------------
# In-page steps (JS run in the ComfyUI page)

# Resolves once node sizes have stopped changing: images (LoadImage previews) and DOM widgets resize their
# nodes a moment after the graph is built, and the layout must use the final sizes.
JS_SETTLE = """
window.__editkitSettle = async () => {
  const sizes = () => JSON.stringify(app.graph._nodes.map(n => [n.id, n.size[0], n.size[1]]));
  let last = sizes(), stable = 0;
  for (let i = 0; i < 100 && stable < 4; i++) {
    await new Promise(r => setTimeout(r, 150));
    const now = sizes();
    stable = now === last ? stable + 1 : 0;
    last = now;
  }
};
"""

# Closes the template dialog the page opens on a first visit and switches to focus mode (no menus or side
# bars), so screenshots show only the graph.
JS_QUIET_UI = """
async () => {
  await window.__editkitSettle();
  document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));
  for (const el of document.querySelectorAll('.p-dialog-mask')) el.remove();
  try { await app.extensionManager.command.execute('Workspace.ToggleFocusMode'); } catch (e) { /* older frontends */ }
  for (const [key, value] of [['Comfy.Minimap.Visible', false], ['Comfy.Graph.CanvasMenu', false]])
    try { await app.extensionManager.setting.set(key, value); } catch (e) { /* setting unknown to this frontend */ }
  await window.__editkitSettle();
  return true;
}
"""

JS_READY = """
(types) => {
  if (!(window.app && app.graph && window.LiteGraph && app.extensionManager)) return null;
  const registered = LiteGraph.registered_node_types;
  if (!Object.keys(registered).length) return null;
  return types.filter(t => !registered[t]);
}
"""

JS_EXPORT = """
async (api, name, controlValue, note, models) => {
  app.loadApiJson(api, name);
  const loaded = app.graph._nodes.length;
  if (loaded !== Object.keys(api).length) return {error: `the page built ${loaded} of ${Object.keys(api).length} nodes`};
  await window.__editkitSettle();
  // The files each loader names, with their download URLs: the frontend's "missing models" dialog reads them
  // when the template is opened (scripts/workflow_notes.py node_models).
  for (const [id, entries] of Object.entries(models)) {
    const node = app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(id);
    if (!node) return {error: `no node ${id} for properties.models`};
    node.properties = {...(node.properties ?? {}), models: entries};
  }
  for (const node of app.graph._nodes)
    for (const widget of node.widgets ?? [])
      for (const linked of widget.linkedWidgets ?? [])
        if (linked.name === 'control_after_generate') linked.value = controlValue;
  // The frontend cuts titles that are wider than the node (drawTitleText keeps a title-height margin on each
  // side); the titles carry the workflow's explanations, so widen such nodes instead.
  const ctx = document.createElement('canvas').getContext('2d');
  for (const node of app.graph._nodes) {
    ctx.font = node.titleFontStyle;
    const width = Math.ceil(ctx.measureText(node.title).width) + 2 * LiteGraph.NODE_TITLE_HEIGHT;
    if (node.size[0] < width) node.setSize([width, node.size[1]]);
  }
  if (note) {
    // The "model files" Note: a virtual node (never queued), with an id after the API file's ids.
    const noteNode = LiteGraph.createNode(note.type);
    noteNode.id = Math.max(0, ...app.graph._nodes.map(n => Number(n.id) || 0)) + 1;
    noteNode.title = note.title;
    app.graph.add(noteNode);
    noteNode.widgets[0].value = note.text;
    noteNode.setSize([note.width, note.height]);
  }
  await window.__editkitSettle();
  return {ok: true};
}
"""

# Shows pictures in the output nodes through the frontend's own handling of ComfyUI's "executed" message, as
# after a run, so the nodes grow the way they will for the user (a run on the CPU takes minutes; --run does it).
JS_SHOW_OUTPUTS = """
async (outputs) => {
  const api = window.comfyAPI?.api?.api ?? app.api;
  for (const [id, images] of Object.entries(outputs))
    api.dispatchCustomEvent('executed', {node: id, display_node: id, output: {images}, prompt_id: 'editkit-export'});
  await window.__editkitSettle();
  return true;
}
"""

# Queues the workflow as the Run button does and waits for the end of the run (--run).
JS_RUN = """
async (timeoutMs) => {
  const api = window.comfyAPI?.api?.api ?? app.api;
  const done = new Promise((resolve) => {
    const finish = (kind) => (e) => resolve({kind, detail: e.detail});
    api.addEventListener('execution_success', finish('success'), {once: true});
    api.addEventListener('execution_error', finish('error'), {once: true});
    api.addEventListener('execution_interrupted', finish('interrupted'), {once: true});
  });
  await app.queuePrompt(0, 1);
  const result = await Promise.race([done, new Promise(r => setTimeout(() => r({kind: 'timeout'}), timeoutMs))]);
  await window.__editkitSettle();
  return {kind: result.kind, message: result.detail?.exception_message ?? null};
}
"""

# Fits the view to the graph, so DOM widgets (text boxes) are laid out and a screenshot shows everything.
JS_FIT_VIEW = """
async () => {
  const nodes = app.graph._nodes, th = LiteGraph.NODE_TITLE_HEIGHT;
  const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - th));
  const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
  const pad = 40;
  app.canvas.ds.fitToBounds([x0 - pad, y0 - pad, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad], {zoom: 0.98});
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  await window.__editkitSettle();
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const rect = app.canvas.canvas.getBoundingClientRect();
  return {x: rect.x, y: rect.y, width: rect.width, height: rect.height};
}
"""

# Text boxes (multiline widgets, the Note) that cannot show all their lines; with grow, enlarge their nodes.
JS_TEXT_BOXES = """
async (grow) => {
  const problems = [];
  for (let round = 0; round < 6; round++) {
    problems.length = 0;
    let changed = false;
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    for (const node of app.graph._nodes)
      for (const widget of node.widgets ?? []) {
        const el = widget.element ?? widget.inputEl;
        if (!(el instanceof HTMLTextAreaElement)) continue;
        if (!el.clientHeight) { problems.push(`node ${node.id}: the text box '${widget.name}' is not displayed`); continue; }
        const missing = el.scrollHeight - el.clientHeight;
        if (missing <= 1) continue;
        if (grow) { node.setSize([node.size[0], node.size[1] + missing + 8]); changed = true; }
        else problems.push(`node ${node.id}: the text box '${widget.name}' hides ${missing} px of its text`);
      }
    if (!changed) break;
    await window.__editkitSettle();
  }
  return problems;
}
"""

# Node sizes and slot positions (relative to each node's pos), as the frontend draws them.
JS_GEOMETRY = """
() => {
  const nodes = {};
  for (const node of app.graph._nodes) {
    const rel = (p) => [p[0] - node.pos[0], p[1] - node.pos[1]];
    nodes[String(node.id)] = {
      size: [Math.ceil(node.size[0]), Math.ceil(node.size[1])], type: node.type,
      inputs: (node.inputs ?? []).map((_s, i) => rel(node.getConnectionPos(true, i))),
      outputs: (node.outputs ?? []).map((_s, i) => rel(node.getConnectionPos(false, i))),
    };
  }
  const links = [];
  for (const link of Object.values(app.graph.links ?? {}))
    if (link) links.push([String(link.origin_id), link.origin_slot, String(link.target_id), link.target_slot]);
  return {nodes, links, titleHeight: LiteGraph.NODE_TITLE_HEIGHT};
}
"""

JS_APPLY = """
async (positions) => {
  for (const node of app.graph._nodes) {
    const pos = positions[String(node.id)];
    if (pos) node.pos = [Math.round(pos[0]), Math.round(pos[1])];
    node.size = [Math.ceil(node.size[0]), Math.ceil(node.size[1])];
  }
  app.canvas.setDirty(true, true);
  await window.__editkitSettle();
  return {prompt: (await app.graphToPrompt()).output, graph: app.graph.serialize(),
          titleHeight: LiteGraph.NODE_TITLE_HEIGHT};
}
"""

JS_OPEN_TEMPLATE = """
async (ui, name) => {
  // The call the template browser makes (useTemplateWorkflows().loadWorkflowTemplate).
  await app.loadGraphData(ui, true, true, name);
  await window.__editkitSettle();
  return {prompt: (await app.graphToPrompt()).output, graph: app.graph.serialize(),
          titleHeight: LiteGraph.NODE_TITLE_HEIGHT};
}
"""

JS_SERIALIZE = """
() => ({graph: app.graph.serialize(), titleHeight: LiteGraph.NODE_TITLE_HEIGHT})
"""


def open_comfyui(page: DevTools, url: str, class_types: set[str], timeout: float) -> None:
    """Load the ComfyUI page and wait until its node definitions are registered; fail on missing types."""
    page.call("Page.navigate", url=url + "/")
    deadline = time.monotonic() + timeout
    missing = None
    while time.monotonic() < deadline:
        try:
            missing = page.call_js(JS_READY, sorted(class_types))
        except ExportError:
            missing = None  # the page is still loading its scripts
        if missing is not None:
            break
        time.sleep(0.25)
    if missing is None:
        raise ExportError(f"the ComfyUI page at {url} did not become ready in {timeout:.0f} s")
    if missing:
        raise ExportError(f"the page does not know these node types: {', '.join(missing)}. Is the EditKit pack "
                          "loaded (look for IMPORT FAILED in the ComfyUI log) and are its requirements installed?")
    page.evaluate(JS_SETTLE)
    page.call_js(JS_QUIET_UI)
    page.errors.clear()  # the page's own start-up noise (settings, offline api.comfy.org) is not ours


# --------------------------------------------------------------------------------------------------------------
# Checks on the Python side


def prompt_differences(expected: dict, actual: dict) -> list[str]:
    """Differences between two API prompts in class_type and inputs (``_meta`` is ignored)."""
    problems = []
    for node_id in sorted(set(expected) | set(actual), key=_id_order):
        if node_id not in actual:
            problems.append(f"node {node_id}: missing from the page's prompt")
        elif node_id not in expected:
            problems.append(f"node {node_id}: not in the API file")
        else:
            want, got = expected[node_id], actual[node_id]
            if want["class_type"] != got["class_type"]:
                problems.append(f"node {node_id}: class_type {got['class_type']!r} != {want['class_type']!r}")
            for name in sorted(set(want["inputs"]) | set(got["inputs"])):
                a, b = want["inputs"].get(name, "<absent>"), got["inputs"].get(name, "<absent>")
                if not same_value(a, b):
                    problems.append(f"node {node_id} input {name!r}: page gives {b!r}, API file has {a!r}")
    return problems


def same_value(a, b) -> bool:
    """JSON equality where 30 == 30.0 (JS has one number type) but True != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def _id_order(node_id):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def geometry_nodes(geometry: dict) -> dict[str, workflow_layout.Node]:
    return {i: workflow_layout.Node(tuple(g["size"]), [tuple(p) for p in g["inputs"]], [tuple(p) for p in g["outputs"]])
            for i, g in geometry["nodes"].items()}


def layout_problems(graph: dict, geometry: dict) -> list[str]:
    """Readability of a laid-out graph: no two nodes overlap (title bars included, sizes as measured now, i.e.
    after outputs are shown), every link runs left to right, and links cross no more often, and run through
    other nodes no more often, than in the best arrangement of the same graph."""
    title_height = geometry["titleHeight"]
    nodes = geometry_nodes(geometry)
    positions = {str(n["id"]): tuple(n["pos"]) for n in graph["nodes"]}
    links = [tuple(link) for link in geometry["links"]]
    problems = [f"nodes {a} and {b} overlap" for a, b in workflow_layout.overlaps(nodes, positions, title_height)]
    for origin, _slot, target, _target_slot in links:
        wrapped = positions[target][1] - title_height > positions[origin][1] + nodes[origin].size[1]
        if positions[origin][0] + nodes[origin].size[0] >= positions[target][0] and not wrapped:
            problems.append(f"link {origin} -> {target} runs neither left to right nor down into a second row")
    scale = opening_view(nodes, positions, title_height)["scale"]
    if scale < OPEN_VIEW.min_scale:
        problems.append(f"at {OPEN_WINDOW[0]}x{OPEN_WINDOW[1]} the whole graph fits only at zoom {scale:.2f}, below "
                        f"{OPEN_VIEW.min_scale} where the frontend stops drawing node text")
    notes = [i for i, g in geometry["nodes"].items() if g["type"] in workflow_notes.NOTE_TYPES]
    _best, (_fits, best_crossings, best_through, _rank, _run) = workflow_layout.arrange(
        nodes, links, title_height, notes, OPEN_VIEW)
    crossing = workflow_layout.crossings(nodes, links, positions)
    through = workflow_layout.links_through_nodes(nodes, links, positions, title_height)
    if crossing > best_crossings:
        problems.append(f"links cross {crossing} times; an arrangement with {best_crossings} exists")
    if through > best_through:
        problems.append(f"links run through other nodes {through} times; an arrangement with {best_through} exists")
    return problems


def link_set(graph: dict) -> set[tuple]:
    return {(o, os_, t, ts) for _i, o, os_, t, ts, _ty in graph["links"]}


def without_layout(graph: dict) -> dict:
    copy = json.loads(json.dumps(graph))
    for node in copy["nodes"]:
        for field in LAYOUT_FIELDS:
            node.pop(field, None)
    copy.get("extra", {}).pop("ds", None)  # follows the layout
    return copy


# --------------------------------------------------------------------------------------------------------------
# Output format


def format_json(value, indent: int = 0) -> str:
    """Pretty JSON with sorted keys, where lists of plain values (positions, links, widget values) and short
    objects of plain values stay on one line: every change shows up as a one-line diff and the files stay
    short."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, dict):
        if all(not isinstance(v, (dict, list)) for v in value.values()):
            flat = json.dumps(value, ensure_ascii=False, sort_keys=True)
            if len(flat) <= 80:
                return flat
        items = [f"{inner}{json.dumps(k)}: {format_json(value[k], indent + 1)}" for k in sorted(value)]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return json.dumps(value, ensure_ascii=False)
        return "[\n" + ",\n".join(f"{inner}{format_json(v, indent + 1)}" for v in value) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------------------
# Export and verification of one workflow


def output_pictures(api: dict, object_info: dict) -> dict[str, list[dict]]:
    """For each SaveImage/PreviewImage node: stand-in pictures of the workflow's own example picture (the first
    LoadImage's; a portrait for workflows without one), one per picture the node saves (a history input shows as
    many pictures as its instructions have lines)."""
    loads = [node["inputs"]["image"] for _i, node in sorted(api.items(), key=lambda kv: _id_order(kv[0]))
             if node["class_type"] == "LoadImage" and isinstance(node["inputs"].get("image"), str)]
    picture = {"filename": loads[0] if loads else "editkit_portrait.png", "subfolder": "", "type": "input"}
    shown = {}
    for node_id, node in api.items():
        if node["class_type"] not in ("SaveImage", "PreviewImage"):
            continue
        count = 1
        source = node["inputs"].get("images")
        if isinstance(source, list) and len(source) == 2:
            origin = api.get(str(source[0]), {})
            names = object_info.get(origin.get("class_type", ""), {}).get("output_name", [])
            text = origin.get("inputs", {}).get("instructions")
            if source[1] < len(names) and names[source[1]] == "history" and isinstance(text, str):
                count = max(1, sum(1 for line in text.splitlines() if line.strip()))
        shown[node_id] = [picture] * count
    return shown


def show_outputs(page: DevTools, api: dict, object_info: dict, real_run: bool, timeout: float) -> list[str]:
    """Put the page into its after-a-run state: pictures in every output node (see JS_SHOW_OUTPUTS / --run)."""
    if real_run:
        result = page.call_js(JS_RUN, int(timeout * 1000))
        if result["kind"] != "success":
            return [f"the run in the page ended with {result['kind']}: {result.get('message')}"]
        return []
    page.call_js(JS_SHOW_OUTPUTS, output_pictures(api, object_info))
    return []


def export_one(page: DevTools, name: str, api: dict, object_info: dict, real_run: bool, timeout: float) -> tuple[dict, list[str]]:
    """Build the API graph in the page, add the model-files Note, show outputs as after a run, let text boxes
    grow until they show all their lines, lay the graph out with those sizes, and return its UI serialization
    and any problems found on the way."""
    page.errors.clear()
    try:
        text = workflow_notes.note_text(api)
    except workflow_notes.NoteError as error:
        return {}, [str(error)]
    note = {"type": workflow_notes.NOTE_TYPE, "title": workflow_notes.NOTE_TITLE, "text": text,
            "width": NOTE_WIDTH, "height": 120}
    result = page.call_js(JS_EXPORT, api, name, CONTROL_VALUE, note, workflow_notes.node_models(api))
    if "error" in result:
        return {}, [result["error"]]
    problems = show_outputs(page, api, object_info, real_run, timeout)
    page.call_js(JS_FIT_VIEW)
    problems += [f"text box: {p}" for p in page.call_js(JS_TEXT_BOXES, True)]
    geometry = page.call_js(JS_GEOMETRY)
    notes = [i for i, g in geometry["nodes"].items() if g["type"] in workflow_notes.NOTE_TYPES]
    positions, _score = workflow_layout.arrange(geometry_nodes(geometry), [tuple(x) for x in geometry["links"]],
                                                geometry["titleHeight"], notes, OPEN_VIEW)
    result = page.call_js(JS_APPLY, {k: list(v) for k, v in positions.items()})
    problems += [f"page error while loading: {e}" for e in page.errors]
    problems += [f"loadApiJson: {p}" for p in prompt_differences(api, result["prompt"])]
    problems += [f"layout: {p}" for p in layout_problems(result["graph"], page.call_js(JS_GEOMETRY))]
    graph = result["graph"]
    final = page.call_js(JS_GEOMETRY)
    graph.setdefault("extra", {})["ds"] = opening_view(geometry_nodes(final), {str(n["id"]): tuple(n["pos"])
                                                       for n in graph["nodes"]}, final["titleHeight"])
    return graph, problems


def opening_view(nodes: dict[str, workflow_layout.Node], positions: dict, title_height: float) -> dict:
    """The zoom and offset the template opens with (extra.ds, restored by the template browser): the whole graph
    at the top left of OPEN_VIEW, at most at 100 %, clear of the minimap and tool bar (workflow_layout.fit_scale).
    LiteGraph draws a graph point p at (p + offset) * scale."""
    x0, y0, _x1, _y1 = workflow_layout.bounds(nodes, positions, title_height)
    scale = math.floor(workflow_layout.fit_scale(nodes, positions, title_height, OPEN_VIEW) * 1e4) / 1e4
    edge = OPEN_VIEW.margin / scale + OPEN_VIEW.pad
    return {"offset": [round(edge - x0, 2), round(edge - y0, 2)], "scale": scale}


def verify_template(page: DevTools, name: str, api: dict, ui: dict, object_info: dict, real_run: bool,
                    timeout: float) -> list[str]:
    """Open the UI file as the template browser does and compare what the page then holds and would queue (the
    prompt, the Note, each loader's properties.models); check the layout as opened and again after outputs are
    shown."""
    page.errors.clear()
    result = page.call_js(JS_OPEN_TEMPLATE, ui, name)
    graph = result["graph"]
    problems = [f"page error while opening: {e}" for e in page.errors]
    if len(graph["nodes"]) != len(ui["nodes"]):
        problems.append(f"opened with {len(graph['nodes'])} nodes, the file has {len(ui['nodes'])}")
    if link_set(graph) != link_set(ui):
        problems.append(f"opened with links {sorted(link_set(graph))}, the file has {sorted(link_set(ui))}")
    # A node without widgets serializes its values as missing/None once and as [] after a reload.
    saved = {n["id"]: n.get("widgets_values") or [] for n in ui["nodes"]}
    for node in graph["nodes"]:
        if not same_value(node.get("widgets_values") or [], saved.get(node["id"])):
            problems.append(f"node {node['id']}: opened with widgets_values {node.get('widgets_values')}, "
                            f"the file has {saved.get(node['id'])}")
    try:
        want_note = workflow_notes.note_text(api)
    except workflow_notes.NoteError as error:
        want_note = None
        problems.append(str(error))
    notes = [n for n in graph["nodes"] if n["type"] in workflow_notes.NOTE_TYPES]
    if want_note is not None and [n.get("widgets_values") for n in notes] != [[want_note]]:
        problems.append("the model-files Note is missing or out of date (workflows/notes/models.json changed?)")
    problems += [f"graphToPrompt: {p}" for p in prompt_differences(api, result["prompt"])]
    problems += [f"properties.models: {p}" for p in models_differences(api, graph)]
    problems += [f"layout after opening: {p}" for p in layout_problems(graph, page.call_js(JS_GEOMETRY))]
    page.call_js(JS_FIT_VIEW)
    problems += [f"text box after opening: {p}" for p in page.call_js(JS_TEXT_BOXES, False)]
    problems += show_outputs(page, api, object_info, real_run, timeout)
    after = page.call_js(JS_SERIALIZE)
    problems += [f"layout after a run: {p}" for p in layout_problems(after["graph"], page.call_js(JS_GEOMETRY))]
    page.call_js(JS_FIT_VIEW)
    problems += [f"text box after a run: {p}" for p in page.call_js(JS_TEXT_BOXES, False)]
    return problems


def models_differences(api: dict, graph: dict) -> list[str]:
    """Each node's properties.models against workflows/notes/models.json (workflow_notes.node_models)."""
    want = workflow_notes.node_models(api)
    problems = []
    for node in graph["nodes"]:
        got = (node.get("properties") or {}).get("models")
        expected = want.get(str(node["id"]))
        if got != expected and not (got in (None, []) and expected is None):
            problems.append(f"node {node['id']} lists {got}, expected {expected}")
    return problems


def run(args: argparse.Namespace) -> int:
    api_files = sorted(API_DIR.glob("*.json"))
    if args.names:
        wanted = set(args.names)
        api_files = [p for p in api_files if p.stem in wanted]
        unknown = wanted - {p.stem for p in api_files}
        if unknown:
            raise ExportError(f"no workflows/api/<name>.json for: {', '.join(sorted(unknown))}")
    if not api_files:
        raise ExportError(f"no API workflows in {API_DIR}")
    apis = {p.stem: json.loads(p.read_text()) for p in api_files}
    class_types = {node["class_type"] for api in apis.values() for node in api.values()}
    chromium = find_chromium(args.chromium)

    if args.url:
        server = contextlib.nullcontext(args.url.rstrip("/"))
    else:
        server = own_comfyui(Path(args.comfy_root), args.python, Path(args.models) if args.models else None,
                             args.port, args.timeout)
    out_dir = Path(args.out_dir).resolve() if args.out_dir else UI_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    with server as url:
        try:
            object_info = _http_json(f"{url}/object_info", timeout=120)
            known = set(object_info)
        except (OSError, ValueError) as error:
            raise ExportError(f"cannot read {url}/object_info: {error}") from error
        if class_types - known:
            raise ExportError(f"ComfyUI at {url} has no node types {sorted(class_types - known)}; is the EditKit "
                              "pack loaded there (look for IMPORT FAILED in its log)?")
        with chromium_page(chromium, args.timeout) as page:
            open_comfyui(page, url, class_types, args.timeout)
            for name, api in apis.items():
                target = out_dir / f"{name}.json"
                graph, problems = export_one(page, name, api, object_info, args.run, args.timeout)
                if graph and not problems:
                    text = format_json(graph) + "\n"
                    if args.check:
                        problems += _staleness(target, graph)
                    elif not target.is_file() or target.read_text(encoding="utf-8") != text:
                        target.write_text(text, encoding="utf-8")
                        print(f"wrote {_shown(target)}")
                    else:
                        print(f"unchanged {_shown(target)}")
                if target.is_file() and (not problems or args.check):
                    ui = json.loads(target.read_text(encoding="utf-8"))
                    problems += [f"template round trip: {p}" for p in
                                 verify_template(page, name, api, ui, object_info, args.run, args.timeout)]
                if problems:
                    failures += 1
                    print(f"FAILED {name}:\n  " + "\n  ".join(problems), file=sys.stderr)
                else:
                    print(f"ok {name}: opens as a template, queues the same prompt as workflows/api/{name}.json, "
                          "and keeps its layout after a run")
    return 1 if failures else 0


def _staleness(target: Path, graph: dict) -> list[str]:
    """--check: the committed UI file must equal a fresh export, apart from layout."""
    if not target.is_file():
        return [f"{_shown(target)} is missing; run without --check to write it"]
    saved = json.loads(target.read_text(encoding="utf-8"))
    if without_layout(saved) != without_layout(json.loads(format_json(graph))):
        return [f"{_shown(target)} differs from a fresh export; run without --check to rewrite it"]
    if saved != json.loads(format_json(graph)):
        print(f"note: {_shown(target)} has other node positions/sizes than a fresh export "
              "(fonts differ between machines); not an error")
    return []


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Requirements: Chromium (apt-get install -y chromium, or --chromium PATH), and either a ComfyUI "
               "checkout plus a Python with its requirements and this pack's (--comfy-root, --python), or a "
               "running ComfyUI with this pack loaded (--url). Only the Python standard library is needed to "
               "run this script. Exit status 1 when any workflow fails its checks.")
    parser.add_argument("names", nargs="*", help="workflow names (default: every workflows/api/*.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="use the ComfyUI running at this address (it must have EditKit loaded)")
    source.add_argument("--comfy-root", help="start ComfyUI from this checkout for the duration of the export")
    parser.add_argument("--python", default=sys.executable,
                        help="Python to run ComfyUI with (default: this one)")
    parser.add_argument("--models", help="folder whose sub-folders (diffusers, vae, ...) become model folders")
    parser.add_argument("--port", type=int, help="port for the started ComfyUI (default: a free one)")
    parser.add_argument("--chromium", help="browser executable (default: chromium from PATH or $CHROMIUM)")
    parser.add_argument("--run", action="store_true",
                        help="before laying out and when checking, run each workflow in the page (needs --models "
                             "with files for every loader; minutes per workflow on a CPU) instead of showing "
                             "stand-in pictures in the output nodes")
    parser.add_argument("--check", action="store_true",
                        help="write nothing: fail if a UI file is missing, differs from a fresh export (layout "
                             "aside) or does not round-trip through the template loader")
    parser.add_argument("--out-dir", help="write (or --check) the UI files here instead of workflows/, e.g. to "
                                          "preview an export without touching the tree")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for ComfyUI and the page")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ExportError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
