"""Check the bundled templates the way a new user meets them: in ComfyUI's real frontend, in headless Chromium.

    python scripts/check_templates_in_browser.py --comfy-root /tmp/ComfyUI --python /tmp/comfy-venv/bin/python \\
        --out /tmp/template-check [name ...]

It starts ComfyUI (this repository as the pack ``editkit``, an empty models tree of its own), opens the page in a
1600x1000 window with the default UI (menus, side bar, minimap) and a fresh profile, and checks, through the
template browser exactly as a user clicks it:

* **Thumbnails at card size**: every EditKit card shows its ``workflows/<name>.jpg`` (the image loaded, at the
  size the script draws); screenshots of the browser go to ``--out`` (look at them).
* **Missing models**: opening a template whose files are absent shows the frontend's "Missing Models" dialog
  listing exactly the files of its loaders' ``properties.models`` (``directory / name``); once files of those
  names exist in the models folders, the same templates open without it.
* **Opening view**: each template opens at a zoom where LiteGraph still draws node text (not low quality), with
  every node inside the canvas and clear of the minimap and the canvas tool bar.
* **A missing file at queue time**: queueing a template whose files are absent shows the loader's own message
  (the folder it looked in, where to get the file), not "Value not in list".
* **Search**: the node search finds EditKit nodes for the words users type (upscale, text to image, inpaint,
  edit, background).

Exit status 1 when a check fails; ``--out`` also gets ``report.json``. Needs Chromium (``apt-get install -y
chromium``) and a ComfyUI checkout with a Python that has its requirements and this pack's;
``tests/test_templates_in_browser.py`` (slow) runs it. Standard library only, like the export script it reuses.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_ui_workflows as ex  # noqa: E402
import make_thumbnails  # noqa: E402
import workflow_notes  # noqa: E402

ROOT = ex.ROOT
SEARCHES = {  # query -> an EditKit node (display name) it must find
    "upscale": "EditKit · Z-Image Progressive Upscale",
    "text to image": "EditKit · Flux Text to Image Sampler",
    "inpaint": "EditKit · Flux Fill Inpaint",
    "edit": "EditKit · Qwen-Image Edit / Inpaint",
    "background": "EditKit · BEN2 Remove Background",
}
QUEUE_CHECK = ("flux_fill_outpaint", "transformer_file 'flux1-fill-dev-Q8_0.gguf' is not in ")

# --------------------------------------------------------------------------------------------------------------
# In-page steps

JS_DIALOG_TEXTS = """
() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)
"""

JS_OPEN_BROWSER = """
async (pack, names) => {
  // Ours, not the cards of the category shown before the click (they share the data-testid pattern).
  const visible = () => names.some(n => document.querySelector(`[data-testid="template-workflow-${n}"]`));
  const entry = () => Array.from(document.querySelectorAll('.p-dialog li')).find(e => e.textContent.trim() === pack);
  for (let attempt = 0; attempt < 3 && !entry(); attempt++) {
    await app.extensionManager.command.execute('Comfy.BrowseTemplates');
    for (let i = 0; i < 50 && !entry(); i++) await new Promise(r => setTimeout(r, 100));
  }
  if (!entry()) return [];
  entry().click();
  for (let i = 0; i < 300 && !visible(); i++) await new Promise(r => setTimeout(r, 100));
  // The grid renders more cards as it is scrolled: scroll to the end until no more appear, then back up.
  const cards = () => document.querySelectorAll('[data-testid^="template-workflow-"]').length;
  const grid = document.querySelector('.p-dialog .p-dataview-content');
  for (let last = -1, i = 0; grid && i < 50 && cards() !== last; i++) {
    last = cards();
    grid.scrollTop = grid.scrollHeight;
    await new Promise(r => setTimeout(r, 400));
  }
  if (grid) grid.scrollTop = 0;
  await new Promise(r => setTimeout(r, 500));
  return Array.from(document.querySelectorAll('[data-testid^="template-workflow-"]')).map(e => e.dataset.testid);
}
"""

# Scrolls each card into view (the browser loads thumbnails lazily) and reports its image.
JS_CARD_IMAGES = """
async (names) => {
  const out = {};
  for (const name of names) {
    const card = document.querySelector(`[data-testid="template-workflow-${name}"]`);
    if (!card) { out[name] = null; continue; }
    card.scrollIntoView({block: 'center'});
    let img = null;
    for (let i = 0; i < 60; i++) {
      img = card.querySelector('img');
      if (img && img.complete && img.naturalWidth) break;
      await new Promise(r => setTimeout(r, 100));
    }
    const box = img ? img.getBoundingClientRect() : null;
    out[name] = img ? {natural: [img.naturalWidth, img.naturalHeight], shown: [box.width, box.height]} : {};
  }
  return out;
}
"""

# Scrolls the card grid to page ``index`` (0: the top), waits for its thumbnails; returns the number of pages.
JS_SCROLL_GRID = """
async (index) => {
  const grid = document.querySelector('.p-dialog .p-dataview-content');
  if (!grid) return 0;
  grid.scrollTop = index * grid.clientHeight * 0.9;
  await new Promise(r => setTimeout(r, 1500));
  return Math.ceil(grid.scrollHeight / (grid.clientHeight * 0.9));
}
"""

JS_CLICK_CARD = """
async (name) => {
  const card = document.querySelector(`[data-testid="template-workflow-${name}"]`);
  if (!card) return false;
  card.scrollIntoView({block: 'center'});
  await new Promise(r => setTimeout(r, 200));
  card.click();
  return true;
}
"""

JS_GRAPH_READY = """
async (count) => {
  for (let i = 0; i < 150; i++) {
    if (app.graph._nodes.length === count) break;
    await new Promise(r => setTimeout(r, 100));
  }
  await window.__editkitSettle();
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return app.graph._nodes.length;
}
"""

JS_CLOSE_DIALOGS = """
async () => {
  for (const dialog of document.querySelectorAll('.p-dialog')) {
    const close = dialog.querySelector('.p-dialog-close-button, button[aria-label="Close"]');
    if (close) close.click();
  }
  for (let i = 0; i < 30 && document.querySelector('.p-dialog'); i++) await new Promise(r => setTimeout(r, 100));
  return document.querySelectorAll('.p-dialog').length;
}
"""

# The opening view: zoom, low-quality flag, and every node's screen box against the canvas and its overlays.
JS_VIEW = """
() => {
  const canvas = app.canvas.canvas.getBoundingClientRect();
  const ds = app.canvas.ds, th = LiteGraph.NODE_TITLE_HEIGHT;
  const rect = (el) => { const b = el.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
  const overlays = Array.from(document.querySelectorAll('.minimap-main-container, .p-buttongroup'))
    .filter(el => el.getBoundingClientRect().width > 0 && el.getBoundingClientRect().bottom > canvas.top + 100)
    .map(rect);
  const nodes = app.graph._nodes.map(n => {
    const x0 = canvas.left + (n.pos[0] + ds.offset[0]) * ds.scale, y0 = canvas.top + (n.pos[1] - th + ds.offset[1]) * ds.scale;
    return {id: n.id, title: n.title, box: [x0, y0, x0 + n.size[0] * ds.scale, y0 + (n.size[1] + th) * ds.scale]};
  });
  return {scale: ds.scale, lowQuality: app.canvas.low_quality, threshold: app.canvas._lowQualityZoomThreshold,
          canvas: [canvas.left, canvas.top, canvas.right, canvas.bottom], overlays, nodes};
}
"""

JS_QUEUE = """
async () => {
  try { await app.queuePrompt(0, 1); } catch (e) { /* the dialog shows it */ }
  for (let i = 0; i < 100; i++) {
    const texts = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText);
    if (texts.some(t => t.includes('Prompt execution failed') || t.includes('failed validation'))) return texts;
    await new Promise(r => setTimeout(r, 100));
  }
  return Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText);
}
"""

JS_SEARCH_RESULTS = """
() => Array.from(document.querySelectorAll('.comfy-vue-node-search-container li[role=option], li.p-autocomplete-option'))
  .map(e => e.innerText.split(/\\u00a0|\\n/)[0].trim())
"""


# --------------------------------------------------------------------------------------------------------------
# Checks


def expected_missing(api: dict) -> list[str]:
    """The dialog's lines for a template whose files are all absent: one per download URL, ``directory / name``."""
    seen, lines = set(), []
    for entries in workflow_notes.node_models(api).values():
        for entry in entries:
            if entry["url"] not in seen:
                seen.add(entry["url"])
                lines.append(f"{entry['directory']} / {entry['name']}")
    return lines


def missing_dialog(page: ex.DevTools) -> str | None:
    """The text of the frontend's missing-models dialog, if one is open (it appears a moment after loading)."""
    for _ in range(20):
        for text in page.call_js(JS_DIALOG_TEXTS):
            if "Missing Models" in text:
                return text
        time.sleep(0.1)
    return None


def view_problems(view: dict) -> list[str]:
    problems = []
    if view["lowQuality"] or view["scale"] < view["threshold"]:
        problems.append(f"opens at zoom {view['scale']:.3f}, below {view['threshold']:.3f}: node text is not drawn")
    cx0, cy0, cx1, cy1 = view["canvas"]
    for node in view["nodes"]:
        x0, y0, x1, y1 = node["box"]
        if x0 < cx0 - 1 or y0 < cy0 - 1 or x1 > cx1 + 1 or y1 > cy1 + 1:
            problems.append(f"node {node['id']} ({node['title']}) is cut off: {[round(v) for v in node['box']]} "
                            f"outside the canvas {[round(v) for v in view['canvas']]}")
        for ox0, oy0, ox1, oy1 in view["overlays"]:
            if x0 < ox1 and ox0 < x1 and y0 < oy1 and oy0 < y1:
                problems.append(f"node {node['id']} ({node['title']}) lies under the minimap or tool bar")
                break
    return problems


def search(page: ex.DevTools, query: str) -> list[str]:
    """The node names the search box lists for ``query``: a real double click on the empty canvas opens it, the
    query is typed, and the list is read in order."""
    left, top, width, height = page.evaluate(
        "(() => { const b = app.canvas.canvas.getBoundingClientRect(); return [b.left, b.top, b.width, b.height]; })()")
    x, y = left + width / 2, top + height / 2
    for clicks in (1, 2):
        for kind in ("mousePressed", "mouseReleased"):
            page.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=clicks)
    time.sleep(1.0)
    page.call("Input.insertText", text=query)
    time.sleep(1.5)
    results = page.call_js(JS_SEARCH_RESULTS)
    page.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
    page.call("Input.dispatchKeyEvent", type="keyUp", key="Escape", code="Escape", windowsVirtualKeyCode=27)
    time.sleep(0.5)
    return results


def screenshot(page: ex.DevTools, path: Path) -> None:
    data = page.call("Page.captureScreenshot", format="png")["data"]
    path.write_bytes(base64.b64decode(data))


def open_page(page: ex.DevTools, url: str, timeout: float) -> None:
    page.call("Emulation.setDeviceMetricsOverride", width=ex.OPEN_WINDOW[0], height=ex.OPEN_WINDOW[1],
              deviceScaleFactor=1, mobile=False)
    page.call("Page.navigate", url=url + "/")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if page.call_js(ex.JS_READY, ["EditKitFluxLoader"]) == []:
                break
        except ex.ExportError:
            pass  # still loading
        time.sleep(0.25)
    else:
        raise ex.ExportError(f"the ComfyUI page at {url} did not become ready with EditKit's nodes")
    page.evaluate(ex.JS_SETTLE)
    page.call_js("async () => { await window.__editkitSettle(); return true; }")
    # A fresh page opens the template browser by itself a moment after loading: wait for it, then close it, so
    # every later step opens it the same way (the Browse Templates command).
    for _ in range(40):
        if any("Template" in text for text in page.call_js(JS_DIALOG_TEXTS)):
            break
        time.sleep(0.25)
    page.call_js(JS_CLOSE_DIALOGS)
    page.errors.clear()


def open_template(page: ex.DevTools, name: str, api: dict) -> list[str]:
    """Open one template from the template browser, as a click on its card does."""
    for _attempt in range(2):  # a page still busy loading may show the browser before its cards
        if f"template-workflow-{name}" in page.call_js(JS_OPEN_BROWSER, ex.PACK_NAME, [name]):
            break
        page.call_js(JS_CLOSE_DIALOGS)
    else:
        return [f"no card for {name} under Custom Nodes, {ex.PACK_NAME}"]
    if not page.call_js(JS_CLICK_CARD, name):
        return [f"cannot click the card of {name}"]
    count = page.call_js(JS_GRAPH_READY, len(api) + 1)  # + the model-files Note
    return [] if count == len(api) + 1 else [f"{name} opened with {count} nodes, expected {len(api) + 1}"]


def check(args: argparse.Namespace) -> dict:
    names = args.names or sorted(p.stem for p in ex.API_DIR.glob("*.json"))
    apis = {n: json.loads((ex.API_DIR / f"{n}.json").read_text(encoding="utf-8")) for n in names}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"problems": [], "templates": {}, "search": {}}
    problems = report["problems"]
    with tempfile.TemporaryDirectory(prefix="editkit-models-") as models_dir:
        models = Path(models_dir)
        directories = {e["directory"] for api in apis.values() for es in workflow_notes.node_models(api).values()
                       for e in es} | {"diffusers", "diffusion_models", "vae", "text_encoders", "clip_vision",
                                       "style_models", "background_removal"}
        for directory in directories:
            (models / directory).mkdir()
        server = ex.own_comfyui(Path(args.comfy_root), args.python, models, args.port, args.timeout)
        with server as url, ex.chromium_page(ex.find_chromium(args.chromium), args.timeout) as page:
            open_page(page, url, args.timeout)
            # 1. The template browser and its thumbnails at card size
            cards = page.call_js(JS_OPEN_BROWSER, ex.PACK_NAME, names)
            images = page.call_js(JS_CARD_IMAGES, names)
            for index in range(page.call_js(JS_SCROLL_GRID, 0)):  # every row of cards, as the user scrolls
                page.call_js(JS_SCROLL_GRID, index)
                screenshot(page, out / f"template_browser_{index + 1}.png")
            for name in names:
                image = images.get(name)
                if f"template-workflow-{name}" not in cards or not image:
                    problems.append(f"{name}: no card in the template browser")
                elif image.get("natural") != [make_thumbnails.SIZE, make_thumbnails.SIZE]:
                    problems.append(f"{name}: the card shows {image.get('natural')}, not the drawn thumbnail")
            # 2. Search words (on the empty canvas the page starts with)
            page.call_js(JS_CLOSE_DIALOGS)
            for query, node in SEARCHES.items():
                results = search(page, query)
                report["search"][query] = results
                if node not in results:
                    problems.append(f"search '{query}' does not list {node}: {results[:12]}")
            # 3. Files absent: the missing-models dialog and the opening view; a queue-time message
            for name, api in apis.items():
                entry = report["templates"].setdefault(name, {})
                found = open_template(page, name, api)
                dialog = missing_dialog(page)
                want = expected_missing(api)
                entry["missing_dialog"] = dialog
                if name == args.screenshot:
                    screenshot(page, out / f"missing_models_{name}.png")
                if want and dialog is None:
                    found.append("no missing-models dialog although its files are absent")
                for line in want:
                    if dialog is not None and line not in dialog:
                        found.append(f"the missing-models dialog does not list {line}")
                if not want and dialog is not None:
                    found.append("a missing-models dialog for a template without downloadable files")
                page.call_js(JS_CLOSE_DIALOGS)
                view = page.call_js(JS_VIEW)
                entry["scale"] = view["scale"]
                found += view_problems(view)
                if name == args.screenshot:
                    screenshot(page, out / f"opened_{name}.png")
                if name == QUEUE_CHECK[0]:
                    texts = page.call_js(JS_QUEUE)
                    screenshot(page, out / f"queue_error_{name}.png")
                    if not any(QUEUE_CHECK[1] in t for t in texts):
                        found.append(f"queueing did not show the loader's message; dialogs: {texts}")
                    elif any("Value not in list" in t for t in texts):
                        found.append("queueing still shows 'Value not in list'")
                    page.call_js(JS_CLOSE_DIALOGS)
                problems += [f"{name}: {p}" for p in found]
            # 4. Files present (empty stand-ins under the names): no dialog
            for api in apis.values():
                for entries in workflow_notes.node_models(api).values():
                    for model in entries:
                        (models / model["directory"] / model["name"]).write_bytes(b"")
            open_page(page, url, args.timeout)
            for name, api in apis.items():
                found = open_template(page, name, api)
                if missing_dialog(page) is not None:
                    found.append("a missing-models dialog although every listed file is present")
                page.call_js(JS_CLOSE_DIALOGS)
                problems += [f"{name} (files present): {p}" for p in found]
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every workflows/api/*.json)")
    parser.add_argument("--comfy-root", required=True, help="the ComfyUI checkout to start")
    parser.add_argument("--python", default=sys.executable, help="Python to run ComfyUI with (default: this one)")
    parser.add_argument("--out", default="template-check", help="folder for screenshots and report.json")
    parser.add_argument("--port", type=int, help="port for the started ComfyUI (default: a free one)")
    parser.add_argument("--chromium", help="browser executable (default: chromium from PATH or $CHROMIUM)")
    parser.add_argument("--screenshot", default=QUEUE_CHECK[0], help="template whose dialog and view to capture")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for ComfyUI and the page")
    args = parser.parse_args(argv)
    try:
        report = check(args)
    except (ex.ExportError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, entry in report["templates"].items():
        print(f"{name}: opens at zoom {entry.get('scale', 0):.2f}; missing-models dialog: "
              f"{'yes' if entry.get('missing_dialog') else 'no'}")
    for query, results in report["search"].items():
        ours = [i + 1 for i, r in enumerate(results) if r.startswith("EditKit")]
        print(f"search '{query}': EditKit nodes at places {ours[:5]}")
    if report["problems"]:
        print("FAILED:\n  " + "\n  ".join(report["problems"]), file=sys.stderr)
        return 1
    print(f"ok: every check passed; screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
