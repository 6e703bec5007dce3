"""The two formats of every bundled workflow stay in sync, checked offline (no browser, no ComfyUI).

``workflows/api/<name>.json`` (API format, what ``POST /prompt`` takes) is hand-written and is the source of
truth; ``workflows/<name>.json`` (UI/LiteGraph format, what ComfyUI's template browser opens) is written from it
by ``scripts/export_ui_workflows.py`` through the real frontend. Someone editing one file and not the other
would ship a template that queues something else than the documented API workflow, or a template that does
not open at all; these tests fail on that drift.

The rules for what the frontend (1.27.10) writes were read from real exports, not assumed:

* Every node input is an input slot, widgets included: first all socket inputs, then all widget inputs, each
  group in declaration order (required, then optional). A widget slot carries ``"widget": {"name": ...}`` and
  the type ``COMBO`` for lists. Link target slots index this list.
* ``widgets_values`` holds one value per widget in the same order. An INT widget with
  ``control_after_generate`` (or, when the option is absent, an INT named ``seed``/``noise_seed``) is followed
  by the control's value; the export tool sets it to "fixed" so the template keeps the API seed.
* A required combo with ``image_upload`` (LoadImage) gets an extra "upload" widget (value "image", slot type
  ``IMAGEUPLOAD``) after all other inputs.

Input specs come from the EditKit classes themselves and, for ComfyUI's own nodes, from
``tests/data/native_node_specs.json`` (ComfyUI 0.3.64's ``/object_info``).
"""

from __future__ import annotations

import copy
import json

import pytest
import workflow_notes

import editkit
from packload import ROOT

WORKFLOWS = ROOT / "workflows"
NOTE_TYPES = workflow_notes.NOTE_TYPES
API_DIR = WORKFLOWS / "api"
NATIVE_SPECS = json.loads((ROOT / "tests" / "data" / "native_node_specs.json").read_text())
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
LEGACY_SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUE = "fixed"
UPLOAD_WIDGET = ("upload", "IMAGEUPLOAD", "image")  # name, slot type, widget value
# Widget options that make the frontend add or change widgets in ways these rules do not describe yet: fail
# rather than guess.
UNHANDLED_OPTIONS = ("video_upload", "animated_image_upload", "remote", "widgetType", "socketless")


class UnknownWidgetRules(Exception):
    """A widget option whose UI serialization these rules do not know yet (fail loudly, never guess)."""


class Linked:
    """Marks a widget whose API input is a link: its widget value is not part of the prompt."""

    def __repr__(self) -> str:
        return "<linked>"


LINKED = Linked()


def api_names() -> list[str]:
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def ui_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def load_pair(name: str) -> tuple[dict, dict]:
    ui_path = WORKFLOWS / f"{name}.json"
    if not ui_path.is_file():
        pytest.fail(f"{ui_path.relative_to(ROOT)} is missing: run scripts/export_ui_workflows.py")
    return (json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8")),
            json.loads(ui_path.read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------------------------
# Node specs


def declared_inputs(class_type: str) -> list[tuple[str, object, dict, str]]:
    """(name, type, options, section) of a node's visible inputs in declaration order (``input_order``:
    required, then optional); KeyError for unknown nodes."""
    if class_type in editkit.NODE_CLASS_MAPPINGS:
        spec = editkit.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
        order = {section: list(spec.get(section, {})) for section in ("required", "optional")}
    else:
        native = NATIVE_SPECS[class_type]
        spec, order = native["input"], native["input_order"]
    return [(name, *_type_and_options(spec[section][name]), section)
            for section in ("required", "optional") for name in order.get(section, [])]


def _type_and_options(value) -> tuple[object, dict]:
    return value[0], (value[1] if len(value) > 1 else {})


def declared_outputs(class_type: str) -> list[tuple[str, str]]:
    """(name, type) of a node's outputs."""
    if class_type in editkit.NODE_CLASS_MAPPINGS:
        cls = editkit.NODE_CLASS_MAPPINGS[class_type]
        types = list(cls.RETURN_TYPES)
        return list(zip(getattr(cls, "RETURN_NAMES", None) or types, types))
    native = NATIVE_SPECS[class_type]
    return list(zip(native["output_name"], native["output"]))


def is_widget(kind, options: dict) -> bool:
    return isinstance(kind, list) or (kind in WIDGET_TYPES and not options.get("forceInput"))


def expected_node(class_type: str, api_inputs: dict) -> tuple[list[tuple], list[tuple]]:
    """What the frontend writes for a node: its input slots as (name, type, is_widget) and its widget
    values as (label, value), where value is LINKED for widgets whose API input is a link and None for
    widgets the API file leaves unset.

    Frontend 1.27.10 adds every socket input first and then every widget input (each with a slot too), both in
    declaration order. The Comfy.UploadImage extension appends an ``upload`` input to the first required combo
    with ``image_upload``; it is not in ``input_order``, so its slot and widget come last."""
    sockets, slots, widgets, upload = [], [], [], False
    for name, kind, options, section in declared_inputs(class_type):
        if not is_widget(kind, options):
            sockets.append((name, kind, False))
            continue
        unhandled = [key for key in UNHANDLED_OPTIONS if options.get(key)]
        if unhandled or (_is_combo(kind) and options.get("control_after_generate")):
            raise UnknownWidgetRules(f"{class_type}.{name} uses {unhandled or 'a combo control'}: the frontend "
                                      "adds widgets for that; export a workflow with it and extend these rules")
        value = api_inputs.get(name)
        slots.append((name, "COMBO" if isinstance(kind, list) else kind, True))
        widgets.append((name, LINKED if _is_link(value) else value))
        if kind == "INT" and options.get("control_after_generate", name in LEGACY_SEED_NAMES):
            widgets.append((f"{name}: control_after_generate", CONTROL_VALUE))
        upload = upload or (section == "required" and _is_combo(kind) and options.get("image_upload") is True)
    if upload:
        upload_name, upload_type, upload_value = UPLOAD_WIDGET
        slots.append((upload_name, upload_type, True))
        widgets.append((upload_name, upload_value))
    return sockets + slots, widgets


def _is_combo(kind) -> bool:
    return isinstance(kind, list) or kind == "COMBO"


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _id_order(node_id: str) -> tuple:
    """Numeric ids in numeric order (the frontend turns numeric API ids into numbers), others after them."""
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def same_value(a, b) -> bool:
    """JSON equality where 30 == 30.0 (the frontend writes JS numbers) but True != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


# ---------------------------------------------------------------------------------------------------------------
# The checker


def twin_problems(api: list[str], ui: list[str]) -> list[str]:
    problems = [f"workflows/api/{n}.json has no UI twin workflows/{n}.json" for n in sorted(set(api) - set(ui))]
    problems += [f"workflows/{n}.json has no API twin workflows/api/{n}.json" for n in sorted(set(ui) - set(api))]
    return problems


def is_api_format(data) -> bool:
    """What the frontend's app.isApiJson tests: an object whose every value has a class_type."""
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "class_type" in v
                                                         for v in data.values())


def is_ui_format(data) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list)
            and "version" in data)


def pair_problems(api: dict, ui: dict) -> list[str]:
    """Every way the UI workflow differs from its API twin (empty when they are in sync)."""
    if not is_api_format(api):
        return ["the API file is not in API format (every value needs a class_type)"]
    if not is_ui_format(ui):
        return ["the UI file is not in UI format (needs nodes, links and version)"]
    problems = []
    graph_nodes = [n for n in ui["nodes"] if n.get("type") not in NOTE_TYPES]  # notes are never queued
    nodes = {str(n["id"]): n for n in graph_nodes}
    if len(nodes) != len(graph_nodes):
        problems.append("the UI file has duplicate node ids")
    if set(nodes) != set(api):
        problems.append(f"node ids differ: API {sorted(api)}, UI {sorted(nodes)}")
    for node_id in sorted(set(nodes) & set(api), key=_id_order):
        problems += [f"node {node_id}: {p}" for p in node_problems(api[node_id], nodes[node_id])]
    problems += link_table_problems(ui, nodes)
    problems += link_problems(api, ui, nodes)
    return problems


def node_problems(api_node: dict, ui_node: dict) -> list[str]:
    class_type = api_node["class_type"]
    if ui_node.get("type") != class_type:
        return [f"UI type {ui_node.get('type')!r} != API class_type {class_type!r}"]
    problems = []
    title = api_node.get("_meta", {}).get("title")
    if title is None:
        problems.append("the API node has no _meta.title (templates show it as the node's title)")
    elif ui_node.get("title") != title:
        problems.append(f"UI title {ui_node.get('title')!r} != API _meta.title {title!r}")
    if ui_node.get("mode", 0) != 0:
        problems.append(f"UI mode {ui_node['mode']} (muted or bypassed nodes are left out of the queued prompt)")
    try:
        declared = {entry[0] for entry in declared_inputs(class_type)}
        slots, widgets = expected_node(class_type, api_node["inputs"])
        outputs = declared_outputs(class_type)
    except KeyError:
        return problems + [f"unknown node type {class_type}: not an EditKit node and not in "
                           "tests/data/native_node_specs.json (add its /object_info entry there)"]
    problems += [f"API input {name!r} is not an input of {class_type}" for name in api_node["inputs"]
                 if name not in declared]
    problems += [f"API file leaves widget {label!r} unset (the template would queue its default)"
                 for label, value in widgets if value is None]

    got_slots = [(s.get("name"), s.get("type"), "widget" in s) for s in ui_node.get("inputs", [])]
    if got_slots != slots:
        problems.append(f"UI input slots {got_slots} != expected {slots}")
    got_outputs = [(o.get("name"), o.get("type")) for o in ui_node.get("outputs", [])]
    if got_outputs != outputs:
        problems.append(f"UI outputs {got_outputs} != expected {outputs}")
    values = ui_node.get("widgets_values", [])
    if len(values) != len(widgets):
        problems.append(f"UI widgets_values {values} has {len(values)} values, expected {len(widgets)} "
                        f"for {[label for label, _ in widgets]}")
    else:
        for (label, want), got in zip(widgets, values):
            if want is not LINKED and want is not None and not same_value(want, got):
                problems.append(f"widget {label!r}: UI {got!r} != API {want!r}")
    return problems


def link_table_problems(ui: dict, nodes: dict) -> list[str]:
    """The UI file's own bookkeeping: LiteGraph keeps each link in three places that must agree."""
    problems = []
    links = {}
    for link in ui["links"]:
        if len(link) != 6:
            problems.append(f"link {link} is not [id, origin, origin_slot, target, target_slot, type]")
            continue
        link_id, origin, origin_slot, target, target_slot, kind = link
        if link_id in links:
            problems.append(f"link id {link_id} is used twice")
        links[link_id] = link
        source, sink = nodes.get(str(origin)), nodes.get(str(target))
        if source is None or sink is None:
            problems.append(f"link {link_id} joins a missing node ({origin} -> {target})")
            continue
        outputs, inputs = source.get("outputs", []), sink.get("inputs", [])
        if not 0 <= origin_slot < len(outputs) or link_id not in (outputs[origin_slot].get("links") or []):
            problems.append(f"link {link_id} is not listed on output {origin_slot} of node {origin}")
        elif outputs[origin_slot].get("type") != kind:
            problems.append(f"link {link_id} has type {kind!r}, output {origin_slot} of node {origin} gives "
                            f"{outputs[origin_slot].get('type')!r}")
        if not 0 <= target_slot < len(inputs) or inputs[target_slot].get("link") != link_id:
            problems.append(f"link {link_id} is not set on input {target_slot} of node {target}")
    for node_id, node in nodes.items():
        for slot, entry in enumerate(node.get("inputs", [])):
            link_id = entry.get("link")
            if link_id is not None and (link_id not in links or str(links[link_id][3]) != node_id
                                        or links[link_id][4] != slot):
                problems.append(f"node {node_id} input {entry.get('name')!r} names link {link_id}, which does "
                                "not end there")
        for slot, entry in enumerate(node.get("outputs", [])):
            for link_id in entry.get("links") or []:
                if link_id not in links or str(links[link_id][1]) != node_id or links[link_id][2] != slot:
                    problems.append(f"node {node_id} output {slot} names link {link_id}, which does not start "
                                    "there")
    if links and ui.get("last_link_id", -1) < max(links):
        problems.append(f"last_link_id {ui.get('last_link_id')} is below the highest link id {max(links)}")
    numeric = [int(i) for i in nodes if i.isdigit()]
    if numeric and ui.get("last_node_id", -1) < max(numeric):
        problems.append(f"last_node_id {ui.get('last_node_id')} is below the highest node id {max(numeric)}")
    return problems


def link_problems(api: dict, ui: dict, nodes: dict) -> list[str]:
    """Each API link [source, slot] into input `name` is exactly one UI link, and the UI has no others."""
    want = []
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if _is_link(value):
                want.append((value[0], value[1], node_id, name))
    got = []
    for link in ui["links"]:
        if len(link) != 6:
            continue
        _link_id, origin, origin_slot, target, target_slot, _kind = link
        inputs = nodes.get(str(target), {}).get("inputs", [])
        name = inputs[target_slot].get("name") if 0 <= target_slot < len(inputs) else f"<slot {target_slot}>"
        got.append((str(origin), origin_slot, str(target), name))
    problems = [f"API link {s}:{o} -> {t}.{n} is missing from the UI file" for s, o, t, n in sorted(set(want) - set(got))]
    problems += [f"UI link {s}:{o} -> {t}.{n} is not in the API file" for s, o, t, n in sorted(set(got) - set(want))]
    if len(got) != len(set(got)):
        problems.append("the UI file links the same output to the same input twice")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Tests on the shipped files


def test_every_workflow_has_both_formats():
    assert api_names(), "no workflows/api/*.json found"
    assert twin_problems(api_names(), ui_names()) == []


def test_no_example_workflows_folder():
    """ComfyUI 0.3.64 lists the templates of example_workflows/ and workflows/ together but serves files only
    from example_workflows/, so the cards of workflows/ would fail silently (checked with frontend 1.27.10)."""
    assert not (ROOT / "example_workflows").exists()


@pytest.mark.parametrize("name", api_names())
def test_files_have_their_formats(name):
    api, ui = load_pair(name)
    assert is_api_format(api), f"workflows/api/{name}.json is not API format"
    assert is_ui_format(ui), f"workflows/{name}.json is not UI format"
    assert not is_api_format(ui) and not is_ui_format(api)


@pytest.mark.parametrize("name", api_names())
def test_ui_workflow_matches_api(name):
    api, ui = load_pair(name)
    assert pair_problems(api, ui) == []


# ---------------------------------------------------------------------------------------------------------------
# The checker catches drift: mutate one side of a shipped pair and expect a precise complaint


# Shipped pair the mutation tests start from: it has EditKit nodes with a seed, a LoadImage and a SaveImage.
MUTATION_BASE = "flux_fill_inpaint"


def _pair(name: str = MUTATION_BASE) -> tuple[dict, dict]:
    api, ui = load_pair(name)
    assert pair_problems(api, ui) == [], "mutation tests need a pair that is in sync to start with"
    return api, ui


def _ui_node(ui: dict, class_type: str) -> dict:
    return next(n for n in ui["nodes"] if n["type"] == class_type)


def _first_constant(api: dict) -> tuple[str, str]:
    """(node id, input name) of an API constant that is a number, so changing it is a plain value change."""
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return node_id, name
    raise AssertionError("no numeric constant in the API workflow")


def _assert_reports(problems: list[str], *fragments: str) -> None:
    assert problems, "the checker found nothing"
    assert any(all(f in p for f in fragments) for p in problems), problems


@pytest.mark.parametrize("name", api_names())
def test_detects_changed_widget_value_in_either_file(name):
    api, ui = _pair(name)
    node_id, input_name = _first_constant(api)
    api[node_id]["inputs"][input_name] += 1
    _assert_reports(pair_problems(api, ui), f"node {node_id}", f"widget {input_name!r}")

    api, ui = _pair(name)
    node = next(n for n in ui["nodes"] if str(n["id"]) == node_id)
    index = [label for label, _ in expected_node(node["type"], api[node_id]["inputs"])[1]].index(input_name)
    node["widgets_values"][index] += 1
    _assert_reports(pair_problems(api, ui), f"node {node_id}", f"widget {input_name!r}")


def test_detects_changed_string_widget():
    api, ui = _pair()
    save = _ui_node(ui, "SaveImage")
    save["widgets_values"][0] += "_changed"
    _assert_reports(pair_problems(api, ui), "widget 'filename_prefix'")


def test_detects_seed_control_other_than_fixed():
    api, ui = _pair()
    node = next(n for n in ui["nodes"] if "seed" in [s["name"] for s in n["inputs"]])
    labels = [label for label, _ in expected_node(node["type"], api[str(node["id"])]["inputs"])[1]]
    node["widgets_values"][labels.index("seed: control_after_generate")] = "randomize"
    _assert_reports(pair_problems(api, ui), "seed: control_after_generate", "'randomize'")


def test_detects_missing_control_or_upload_value():
    api, ui = _pair()
    node = next(n for n in ui["nodes"] if "seed" in [s["name"] for s in n["inputs"]])
    node["widgets_values"].remove(CONTROL_VALUE)
    _assert_reports(pair_problems(api, ui), f"node {node['id']}", "values, expected")

    api, ui = _pair()
    load = _ui_node(ui, "LoadImage")
    load["widgets_values"] = load["widgets_values"][:1]
    _assert_reports(pair_problems(api, ui), f"node {load['id']}", "values, expected")


def test_detects_moved_link_slot():
    api, ui = _pair()
    link = ui["links"][0]
    api_target = api[str(link[3])]
    name = ui_input_name(ui, link)
    api_target["inputs"][name] = [api_target["inputs"][name][0], api_target["inputs"][name][1] + 1]
    _assert_reports(pair_problems(api, ui), "is missing from the UI file")
    _assert_reports(pair_problems(api, ui), "is not in the API file")


def ui_input_name(ui: dict, link: list) -> str:
    target = next(n for n in ui["nodes"] if n["id"] == link[3])
    return target["inputs"][link[4]]["name"]


def test_detects_removed_ui_link():
    api, ui = _pair()
    link = ui["links"].pop()
    _assert_reports(pair_problems(api, ui), "is missing from the UI file")
    _assert_reports(pair_problems(api, ui), f"names link {link[0]}")


def test_detects_extra_ui_link():
    api, ui = _pair()
    link = copy.deepcopy(ui["links"][0])
    link[0] = ui["last_link_id"] + 1
    ui["last_link_id"] = link[0]
    ui["links"].append(link)
    _assert_reports(pair_problems(api, ui), f"link {link[0]} is not listed on output")
    _assert_reports(pair_problems(api, ui), "links the same output to the same input twice")


def test_detects_link_into_wrong_input():
    """Consistent bookkeeping, wrong meaning: the UI link (and the slots' link fields) go to another input."""
    api, ui = _pair()
    link = next(lk for lk in ui["links"] if lk[4] > 0)
    target = next(n for n in ui["nodes"] if n["id"] == link[3])
    old_slot = link[4]
    new_slot = next(i for i, s in enumerate(target["inputs"]) if s["link"] is None)
    target["inputs"][old_slot]["link"], target["inputs"][new_slot]["link"] = None, link[0]
    link[4] = new_slot
    problems = pair_problems(api, ui)
    assert not any("names link" in p or "is not set on input" in p for p in problems), problems
    _assert_reports(problems, f"{target['id']}.{target['inputs'][new_slot]['name']}", "is not in the API file")


def test_detects_title_type_mode_and_id_drift():
    api, ui = _pair()
    ui["nodes"][0]["title"] += " (edited)"
    _assert_reports(pair_problems(api, ui), f"node {ui['nodes'][0]['id']}", "title")

    api, ui = _pair()
    ui["nodes"][0]["mode"] = 4
    _assert_reports(pair_problems(api, ui), "mode 4")

    api, ui = _pair()
    _ui_node(ui, "SaveImage")["type"] = "PreviewImage"
    _assert_reports(pair_problems(api, ui), "'PreviewImage' != API class_type 'SaveImage'")

    api, ui = _pair()
    api["99"] = copy.deepcopy(api[str(_ui_node(ui, "SaveImage")["id"])])
    _assert_reports(pair_problems(api, ui), "node ids differ")


def test_detects_api_input_without_widget_and_unset_widget():
    api, ui = _pair()
    save_id = str(_ui_node(ui, "SaveImage")["id"])
    api[save_id]["inputs"]["not_an_input"] = 1
    _assert_reports(pair_problems(api, ui), "'not_an_input' is not an input of SaveImage")

    api, ui = _pair()
    del api[save_id]["inputs"]["filename_prefix"]
    _assert_reports(pair_problems(api, ui), "leaves widget 'filename_prefix' unset")


def test_detects_changed_input_slots():
    api, ui = _pair()
    load = _ui_node(ui, "LoadImage")
    del load["inputs"][1]["widget"]
    _assert_reports(pair_problems(api, ui), f"node {load['id']}", "UI input slots")


def test_detects_swapped_formats_and_missing_twins():
    api, ui = _pair()
    assert pair_problems(api, api) == ["the UI file is not in UI format (needs nodes, links and version)"]
    assert pair_problems(ui, ui) == ["the API file is not in API format (every value needs a class_type)"]
    assert twin_problems(["a", "b"], ["b", "c"]) == ["workflows/api/a.json has no UI twin workflows/a.json",
                                                    "workflows/c.json has no API twin workflows/api/c.json"]


def test_unknown_node_type_is_reported():
    api, ui = _pair()
    save_id = str(_ui_node(ui, "SaveImage")["id"])
    api[save_id]["class_type"] = _ui_node(ui, "SaveImage")["type"] = "SomeoneElsesNode"
    _assert_reports(pair_problems(api, ui), "unknown node type SomeoneElsesNode")


class _RuleProbe:
    """A node shaped to exercise every rule at once (it is never shipped)."""

    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE",),
                "seed": ("INT", {"default": 0}),
                "picture": (["a.png", "b.png"], {"image_upload": True}),
                "amount": ("INT", {"forceInput": True}),
            },
            "optional": {
                "mask": ("MASK",),
                "noise_seed": ("INT", {"control_after_generate": False}),
                "steps": ("INT", {"control_after_generate": True}),
                "enabled": ("BOOLEAN", {"default": True}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }


def test_widget_rules_follow_the_frontend(monkeypatch):
    """The rules as frontend 1.27.10 applies them (read in its bundle, confirmed on the Kontext-inpaint
    exports): sockets before widgets, seed names get a control unless the option says no, forceInput makes a
    socket, the upload widget comes last, hidden inputs never appear."""
    monkeypatch.setitem(editkit.NODE_CLASS_MAPPINGS, "RuleProbe", _RuleProbe)
    inputs = {"pixels": ["1", 0], "seed": ["2", 0], "picture": "a.png", "amount": ["3", 0], "noise_seed": 5,
              "steps": 7, "enabled": False}
    slots, widgets = expected_node("RuleProbe", inputs)
    assert slots == [("pixels", "IMAGE", False), ("amount", "INT", False), ("mask", "MASK", False),
                     ("seed", "INT", True), ("picture", "COMBO", True), ("noise_seed", "INT", True),
                     ("steps", "INT", True), ("enabled", "BOOLEAN", True), ("upload", "IMAGEUPLOAD", True)]
    assert widgets == [("seed", LINKED), ("seed: control_after_generate", CONTROL_VALUE), ("picture", "a.png"),
                       ("noise_seed", 5), ("steps", 7), ("steps: control_after_generate", CONTROL_VALUE),
                       ("enabled", False), ("upload", "image")]
    assert same_value(30, 30.0) and not same_value(True, 1) and not same_value(False, 0)


def test_unhandled_widget_options_fail_loudly(monkeypatch):
    class VideoProbe:
        RETURN_TYPES = ()

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"video": (["a.mp4"], {"video_upload": True})}}

    monkeypatch.setitem(editkit.NODE_CLASS_MAPPINGS, "VideoProbe", VideoProbe)
    with pytest.raises(UnknownWidgetRules, match="video_upload"):
        expected_node("VideoProbe", {"video": "a.mp4"})


def test_spec_file_is_comfyui_object_info():
    """The native specs must keep the shape this checker reads (input, input_order, output, output_name)."""
    for class_type in NATIVE_SPECS["_nodes"]:
        spec = NATIVE_SPECS[class_type]
        assert {"input", "input_order", "output", "output_name"} <= set(spec), class_type
        assert len(spec["output"]) == len(spec["output_name"])



# ---------------------------------------------------------------------------------------------------------------
# What a template tells its user: the model-files Note (from workflows/notes/models.json), a thumbnail, a layout


def _notes(ui: dict) -> list[dict]:
    return [n for n in ui["nodes"] if n.get("type") in NOTE_TYPES]


def note_problems(api: dict, ui: dict) -> list[str]:
    try:
        want = workflow_notes.note_text(api)
    except workflow_notes.NoteError as error:
        return [str(error)]
    notes = _notes(ui)
    if len(notes) != 1:
        return [f"the UI file has {len(notes)} Note nodes, expected one model-files Note"]
    if notes[0].get("widgets_values") != [want]:
        return ["the model-files Note differs from workflows/notes/models.json: run scripts/export_ui_workflows.py"]
    if notes[0].get("title") != workflow_notes.NOTE_TITLE:
        return [f"the Note's title is {notes[0].get('title')!r}, expected {workflow_notes.NOTE_TITLE!r}"]
    return []


@pytest.mark.parametrize("name", api_names())
def test_template_has_a_current_model_files_note(name):
    api, ui = load_pair(name)
    assert note_problems(api, ui) == []
    text = _notes(ui)[0]["widgets_values"][0]
    models = workflow_notes.load_models()
    for reference in workflow_notes.model_references(api):
        entry = models[reference]
        assert f"models/{entry['folder']}/{reference}" in text and entry["source"] in text


@pytest.mark.parametrize("name", api_names())
def test_loaders_list_their_files_for_the_missing_models_dialog(name):
    """Each loader's properties.models names the single files it picks, with their download URL and folder, as
    workflows/notes/models.json says (frontend 1.27.10 shows its missing-models dialog from them; the browser
    check proves the dialog). Folders and GGUF files are in the Note only (workflow_notes explains why)."""
    api, ui = load_pair(name)
    models = workflow_notes.load_models()
    listed = {str(n["id"]): (n.get("properties") or {}).get("models") for n in ui["nodes"]}
    expected = workflow_notes.node_models(api)
    assert {k: v for k, v in listed.items() if v} == expected
    for node_id, entries in expected.items():
        values = api[node_id]["inputs"].values()
        for entry in entries:
            assert entry["name"] in values and entry["url"].startswith("https://huggingface.co/")
            assert "/resolve/" in entry["url"] and entry["directory"] == models[entry["name"]]["folder"]
    single = [ref for ref in workflow_notes.model_references(api) if models[ref].get("kind") != "folder"]
    unlisted = {ref for ref in single if ref not in {e["name"] for es in expected.values() for e in es}}
    assert all(ref.endswith(".gguf") or not models[ref].get("url") for ref in unlisted), unlisted


@pytest.mark.parametrize("name", api_names())
def test_thumbnail_is_what_the_script_draws(name):
    """The card picture (workflows/<name>.jpg, which the template browser requests beside the JSON) is drawn by
    scripts/make_thumbnails.py from the example pictures and the API file, and redrawn when they change."""
    import make_thumbnails

    table = make_thumbnails.load_table()
    assert name in table, f"add a row for {name} to workflows/notes/thumbnails.json"
    thumbnail = WORKFLOWS / f"{name}.jpg"
    assert thumbnail.is_file(), f"{thumbnail.relative_to(ROOT)} is missing: run scripts/make_thumbnails.py"
    assert thumbnail.read_bytes()[:3] == b"\xff\xd8\xff"
    api, _ui = load_pair(name)
    drawn = make_thumbnails.render(name, api, table[name])
    assert drawn.size == (make_thumbnails.SIZE, make_thumbnails.SIZE)
    assert make_thumbnails.difference(thumbnail, drawn) <= make_thumbnails.STALE_ABOVE, \
        f"{thumbnail.relative_to(ROOT)} is out of date: run scripts/make_thumbnails.py"


def test_thumbnail_check_notices_a_changed_prompt():
    import make_thumbnails

    name = "flux_fill_inpaint"
    api, _ui = load_pair(name)
    api["2"]["inputs"]["prompt"] = "a blue vase of tulips"
    drawn = make_thumbnails.render(name, api, make_thumbnails.load_table()[name])
    assert make_thumbnails.difference(WORKFLOWS / f"{name}.jpg", drawn) > make_thumbnails.STALE_ABOVE


@pytest.mark.parametrize("name", api_names())
def test_template_opens_with_every_node_readable_at_1600x1000(name):
    """extra.ds (restored by the template browser) shows every node inside the canvas of a 1600x1000 window,
    clear of the minimap and tool bar, at a zoom where LiteGraph draws node text (above 8/14 = 0.571). Checked
    on the saved sizes here; scripts/check_templates_in_browser.py checks it again in the real frontend."""
    import export_ui_workflows as ex

    _api, ui = load_pair(name)
    ds = ui.get("extra", {}).get("ds")
    assert ds, "no extra.ds: the template would open wherever the user's last view was"
    scale, (ox, oy) = ds["scale"], ds["offset"]
    assert 0.5714 < ex.OPEN_VIEW.min_scale <= scale <= 1.0
    width, height = ex.OPEN_VIEW.width, ex.OPEN_VIEW.height
    corner_x, corner_y = width - ex.OPEN_VIEW.corner[0], height - ex.OPEN_VIEW.corner[1]
    for node in ui["nodes"]:
        x0, y0 = (node["pos"][0] + ox) * scale, (node["pos"][1] - 30 + oy) * scale
        x1, y1 = x0 + node["size"][0] * scale, y0 + (node["size"][1] + 30) * scale
        assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height, (node["id"], node.get("title"))
        assert not (x1 > corner_x and y1 > corner_y), f"node {node['id']} lies under the minimap or tool bar"


@pytest.mark.parametrize("name", api_names())
def test_saved_layout_has_no_overlaps(name):
    """As saved (output nodes already sized for their previews by the export): no boxes overlap, title bars
    included. The export checks the same, and link crossings, in the real frontend after showing outputs."""
    _api, ui = load_pair(name)
    title = 30  # LiteGraph.NODE_TITLE_HEIGHT in frontend 1.27.10
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - title, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in ui["nodes"]}
    ids = sorted(boxes, key=lambda i: _id_order(str(i)))
    overlapping = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
                   if boxes[a][0] < boxes[b][2] and boxes[b][0] < boxes[a][2]
                   and boxes[a][1] < boxes[b][3] and boxes[b][1] < boxes[a][3]]
    assert overlapping == []


def test_one_file_name_per_model_across_workflows():
    """The BEN2 workflows once named the same model BEN2_Base.pth and BEN2_Base.safetensors."""
    names = {json.loads((API_DIR / f"{n}.json").read_text(encoding="utf-8"))[i]["inputs"]["model_name"]
             for n in api_names()
             for i, node in json.loads((API_DIR / f"{n}.json").read_text(encoding="utf-8")).items()
             if node["class_type"] == "EditKitBEN2Loader"}
    assert len(names) == 1, names


def test_note_checker_catches_stale_and_unknown_models():
    api, ui = _pair()
    _notes(ui)[0]["widgets_values"] = ["old text"]
    _assert_reports(note_problems(api, ui), "differs from workflows/notes/models.json")

    api, ui = _pair()
    loader = next(n for n in api.values() if n["class_type"] == "EditKitFluxLoader")
    loader["inputs"]["transformer_file"] = "someone-elses-model.safetensors"
    _assert_reports(note_problems(api, ui), "no entry in workflows/notes/models.json for someone-elses-model")

    api, ui = _pair()
    ui["nodes"] = [n for n in ui["nodes"] if n.get("type") not in NOTE_TYPES]
    _assert_reports(note_problems(api, ui), "0 Note nodes")
    assert pair_problems(api, ui) == []  # the Note is not part of the API twin


def test_layout_untangles_links_and_leaves_room():
    """A graph whose id order crosses its links (node 2 feeds 5, node 3 feeds 4, 4 above 5 by id): the layout
    reorders the column, so nothing crosses, nothing overlaps and every link runs left to right."""
    import workflow_layout as wl

    def node(w, h, ins, outs):
        return wl.Node((w, h), [(0, 10 + 20 * i) for i in range(ins)], [(w, 10 + 20 * i) for i in range(outs)])

    nodes = {"1": node(200, 100, 0, 2), "2": node(200, 100, 1, 1), "3": node(200, 100, 1, 1),
             "4": node(200, 300, 1, 0), "5": node(200, 100, 1, 0), "9": node(400, 200, 0, 0)}
    links = [("1", 0, "3", 0), ("1", 1, "2", 0), ("2", 0, "5", 0), ("3", 0, "4", 0)]
    naive = wl.place(nodes, [["1"], ["2", "3"], ["4", "5"]], 30, ["9"])
    assert wl.crossings(nodes, links, naive) > 0  # the test graph really is tangled in id order
    positions, (_fits, crossing, through, _rank, _run) = wl.arrange(nodes, links, 30, ["9"])
    assert crossing == wl.crossings(nodes, links, positions) == 0 and through == 0
    assert wl.overlaps(nodes, positions, 30) == []
    assert positions["9"][0] == 0 and all(positions[n][0] > 400 for n in "12345")  # the note column comes first
    for origin, _o, target, _t in links:
        assert positions[origin][0] + nodes[origin].size[0] < positions[target][0]
