"""The experiments file: which bundled workflow serves each app feature, and where parameters go.

The shape is the seed applications' (``comfyui: {base_url, timeout}``, ``experiments: [{id, name,
description, models, features: [{id, name, requires_mask}]}]``) with, per feature:

* ``workflow``: a bundled workflow name (``workflows/api/<name>.json``);
* ``parameters``: request parameter → ``NODE.INPUT`` (node id or title; ``*.INPUT`` = every node
  with that constant input). ``input_image`` goes to a LoadImage ``image`` (the picture is uploaded)
  or to any other text input (e.g. a base64 loader's ``data``), which gets the base64 string;
* ``outputs``: ``image`` (node whose pictures are the answer; default: the first SaveImage) and
  ``background_removed`` (``NODE`` or ``{node, output, set}``: that node's picture output, from a
  copy of the node with ``set`` inputs changed when given, e.g. BEN2 with ``invert: false``);
* ``recommended`` (optional): per numeric parameter ``{min, max, default}``, the ranges the page at
  ``/`` offers (the guide's per-feature values); requests may still send any value the node takes.

Pictures beyond the first (``input_image_2`` …, e.g. multi-picture edits) and the outpainting sides
(``extend_left`` …) are parameters like the others. The experiments endpoint lists, per feature, how
many pictures it takes, which parameters it accepts with the workflow's values as defaults, the
recommended ranges and whether it returns a cut-out, so a page can build its form from it alone.

A ``generate`` section maps ``/generate`` modes (``redux``) the same way, plus per mode:

* ``with_prompt``: a second entry of the same shape (workflow, parameters, outputs) used when the
  request has a non-empty ``prompt`` (Redux with a text encoder); without it (and without a ``prompt``
  target in the mode's own parameters) such a request is refused with a 400 that says why, instead of
  ignoring the prompt;
* ``model_ids``: the ``model_id`` values the mode answers to (a request naming another is refused).

Everything is checked against the bundled workflows at startup, so a typo fails the start, not a
user's request. An entry marked ``optional: true`` whose workflow is not bundled (yet) is disabled
instead, and requests for it answer 501 with the reason; that is how the file can name workflows
other work will add.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import WorkflowError
from .workflow import BUNDLED_DIR, bundled_names, find_node, load_workflow, resolve_target

DEFAULT_FILE = Path(__file__).resolve().parent / "experiments.yaml"
EDIT_PARAMETERS = ("input_image", "input_image_2", "input_image_3", "input_image_4", "prompt", "steps",
                   "guidance_scale", "strength", "negative_prompt", "seed", "extend_left", "extend_top",
                   "extend_right", "extend_bottom")
PICTURE_PARAMETERS = ("input_image", "input_image_2", "input_image_3", "input_image_4")
RANGED = ("steps", "guidance_scale", "strength", "seed", "extend_left", "extend_top", "extend_right", "extend_bottom")
GENERATE_PARAMETERS = ("input_image", "prompt", "height", "width", "num_inference_steps", "cfg", "seed", "num_images")


class ExperimentsError(WorkflowError):
    """The experiments file is wrong; the message names the entry and the field."""


@dataclass
class Route:
    """A bundled workflow with resolved parameter targets and output nodes."""

    workflow_name: str
    prompt: dict
    targets: dict[str, list[tuple[str, str]]]
    output_node: str
    background: tuple[str, int, dict] | None = None

    def target_of(self, node_id: str | None, input_name: str | None) -> str | None:
        """The request parameter that feeds ``node_id.input_name`` (to blame the right field)."""
        for parameter, pairs in self.targets.items():
            if (node_id, input_name) in pairs:
                return parameter
        return None


@dataclass
class Feature:
    id: str
    name: str
    requires_mask: bool
    route: Route | None
    disabled: str | None = None
    recommended: dict[str, dict] = field(default_factory=dict)

    def public(self) -> dict:
        """The feature as the experiments endpoint lists it: the seed's ``id`` and ``name``, then how many
        pictures it takes, whether it returns a cut-out, the parameters it accepts (the workflow's values as
        defaults) and the recommended ranges."""
        parameters = {}
        for name, targets in self.route.targets.items():
            if name not in PICTURE_PARAMETERS:
                node_id, input_name = targets[0]
                parameters[name] = self.route.prompt[node_id]["inputs"].get(input_name)
        return {"id": self.id, "name": self.name, "requires_mask": self.requires_mask,
                "pictures": sum(1 for p in PICTURE_PARAMETERS if p in self.route.targets),
                "cutout": self.route.background is not None, "parameters": parameters,
                "recommended": self.recommended}
    prompt_route: Route | None = None  # generate modes: the route for requests with a prompt
    prompt_disabled: str | None = None  # why a prompt cannot be followed (no with_prompt entry)
    model_ids: list[str] = field(default_factory=list)


@dataclass
class Experiment:
    id: str
    name: str
    description: str
    models: list
    features: list[Feature] = field(default_factory=list)


@dataclass
class Experiments:
    base_url: str | None
    timeout: float
    experiments: dict[str, Experiment]
    generate: dict[str, Feature]
    source: str

    def public(self) -> dict:
        """``GET /api/image_editing/experiments``: the seed applications' shape (``id``, ``name``,
        ``description``, ``features: [{id, name}]``) plus what a page needs to build its form (enabled
        features only)."""
        out = []
        for exp in self.experiments.values():
            features = [f.public() for f in exp.features if f.disabled is None]
            if features:
                out.append({"id": exp.id, "name": exp.name, "description": exp.description, "models": exp.models,
                            "features": features})
        return {"experiments": out}


def _require(mapping: Any, key: str, where: str, kind=str, default: Any = ...) -> Any:
    if not isinstance(mapping, dict):
        raise ExperimentsError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    if key not in mapping or mapping[key] is None:
        if default is ...:
            raise ExperimentsError(f"{where}: '{key}' is missing")
        return default
    value = mapping[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise ExperimentsError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _route(entry: dict, where: str, allowed: tuple, folder: Path) -> tuple[Route | None, str | None]:
    name = _require(entry, "workflow", where)
    optional = bool(entry.get("optional", False))
    if name not in bundled_names(folder):
        message = (f"{where}.workflow: no bundled workflow '{name}' (bundled: {', '.join(bundled_names(folder))})")
        if optional:
            return None, f"the bundled workflow '{name}' is not available in this EditKit"
        raise ExperimentsError(message)
    prompt = load_workflow(name, folder)
    parameters = _require(entry, "parameters", where, dict, {})
    targets: dict[str, list[tuple[str, str]]] = {}
    for parameter, target in parameters.items():
        if parameter not in allowed:
            raise ExperimentsError(f"{where}.parameters: unknown parameter '{parameter}' (known: {', '.join(allowed)})")
        try:
            targets[parameter] = resolve_target(prompt, str(target))
        except WorkflowError as exc:
            raise ExperimentsError(f"{where}.parameters.{parameter}: target '{target}' does not fit workflow "
                                   f"'{name}': {exc}") from exc
    outputs = _require(entry, "outputs", where, dict, {})
    unknown = sorted(set(outputs) - {"image", "background_removed"})
    if unknown:
        raise ExperimentsError(f"{where}.outputs: unknown key '{unknown[0]}' (known: image, background_removed)")
    try:
        if "image" in outputs:
            output_node = find_node(prompt, str(outputs["image"]))
        else:
            saves = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
            if not saves:
                raise ExperimentsError(f"{where}.outputs.image: workflow '{name}' has no SaveImage; name the node")
            output_node = saves[0]
        background = None
        if outputs.get("background_removed") is not None:
            spec = outputs["background_removed"]
            if not isinstance(spec, dict):
                spec = {"node": spec}
            unknown = sorted(set(spec) - {"node", "output", "set"})
            if unknown:
                raise ExperimentsError(f"{where}.outputs.background_removed: unknown key '{unknown[0]}' "
                                       "(known: node, output, set)")
            node_id = find_node(prompt, str(_require(spec, "node", f"{where}.outputs.background_removed", (str, int))))
            overrides = spec.get("set") or {}
            for input_name in overrides:
                if input_name not in prompt[node_id]["inputs"]:
                    raise ExperimentsError(f"{where}.outputs.background_removed.set: node {node_id} has no input "
                                           f"'{input_name}'")
            background = (node_id, int(spec.get("output", 0)), dict(overrides))
    except WorkflowError as exc:
        if isinstance(exc, ExperimentsError):
            raise
        raise ExperimentsError(f"{where}.outputs: {exc}") from exc
    return Route(name, prompt, targets, output_node, background), None


def _recommended(entry: dict, where: str, route: Route | None) -> dict[str, dict]:
    """``recommended: {steps: {min, max, default}, ...}``: numeric parameters the feature maps, min ≤ default ≤ max."""
    ranges = _require(entry, "recommended", where, dict, {})
    out = {}
    for name, spec in ranges.items():
        label = f"{where}.recommended.{name}"
        if name not in RANGED:
            raise ExperimentsError(f"{label}: not a numeric parameter (known: {', '.join(RANGED)})")
        if route is not None and name not in route.targets:
            raise ExperimentsError(f"{label}: the feature has no parameter '{name}' (map it under parameters)")
        values = {key: _require(spec, key, label, float) for key in ("min", "max", "default")}
        unknown = sorted(set(spec) - set(values))
        if unknown:
            raise ExperimentsError(f"{label}: unknown key '{unknown[0]}' (known: min, max, default)")
        if not values["min"] <= values["default"] <= values["max"]:
            raise ExperimentsError(f"{label}: expected min ≤ default ≤ max, got {values}")
        whole = name not in ("strength", "guidance_scale")
        if whole and not all(float(v).is_integer() for v in values.values()):
            raise ExperimentsError(f"{label}: '{name}' takes whole numbers, got {values}")
        out[name] = {k: int(v) if whole else v for k, v in values.items()}
    return out


def load_experiments(path: Path | str = DEFAULT_FILE, folder: Path = BUNDLED_DIR) -> Experiments:
    """Read and check the experiments file; every problem names its place in the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ExperimentsError(f"cannot read experiments file '{path}': {exc}") from exc
    where = str(path)
    comfyui = _require(data, "comfyui", where, dict, {})
    base_url = _require(comfyui, "base_url", f"{where}: comfyui", str, None)
    timeout = _require(comfyui, "timeout", f"{where}: comfyui", float, 600.0)
    experiments: dict[str, Experiment] = {}
    for index, entry in enumerate(_require(data, "experiments", where, list)):
        label = f"{where}: experiments[{index}]"
        exp_id = _require(entry, "id", label)
        label = f"{where}: experiments[{index}] ({exp_id})"
        if exp_id in experiments:
            raise ExperimentsError(f"{label}: the id '{exp_id}' is used twice")
        exp = Experiment(exp_id, _require(entry, "name", label), _require(entry, "description", label, str, ""),
                         list(_require(entry, "models", label, list, [])))
        for f_index, feat in enumerate(_require(entry, "features", label, list)):
            f_label = f"{label}.features[{f_index}]"
            feat_id = _require(feat, "id", f_label)
            f_label = f"{label}.features[{f_index}] ({feat_id})"
            if any(f.id == feat_id for f in exp.features):
                raise ExperimentsError(f"{f_label}: the feature id '{feat_id}' is used twice")
            route, disabled = _route(feat, f_label, EDIT_PARAMETERS, folder)
            exp.features.append(Feature(feat_id, _require(feat, "name", f_label),
                                        bool(feat.get("requires_mask", False)), route, disabled,
                                        _recommended(feat, f_label, route)))
        experiments[exp_id] = exp
    generate: dict[str, Feature] = {}
    for mode, entry in (_require(data, "generate", where, dict, {}) or {}).items():
        g_label = f"{where}: generate.{mode}"
        unknown = sorted(set(entry or {}) - GENERATE_KEYS)
        if unknown:
            raise ExperimentsError(f"{g_label}: unknown key '{unknown[0]}' (known: {', '.join(sorted(GENERATE_KEYS))})")
        route, disabled = _route(entry, g_label, GENERATE_PARAMETERS, folder)
        feature = Feature(str(mode), str(mode), False, route, disabled)
        feature.model_ids = [str(m) for m in _require(entry, "model_ids", g_label, list, [])]
        with_prompt = _require(entry, "with_prompt", g_label, dict, None)
        if with_prompt is None and route is not None and "prompt" in route.targets:
            feature.prompt_route = route  # the mode's own workflow takes the prompt
        elif with_prompt is None:
            feature.prompt_disabled = (f"mode '{mode}' here has no text encoder configured, so it cannot follow "
                                       f"'prompt': send it without a prompt, or add generate.{mode}.with_prompt "
                                       f"(e.g. workflow flux_redux_with_prompt) to {path}")
        else:
            feature.prompt_route, why = _route(with_prompt, f"{g_label}.with_prompt", GENERATE_PARAMETERS, folder)
            if why:
                feature.prompt_disabled = f"mode '{mode}' cannot follow 'prompt' here: {why}"
            elif "prompt" not in feature.prompt_route.targets:
                raise ExperimentsError(f"{g_label}.with_prompt.parameters: 'prompt' must say where the prompt goes")
        generate[str(mode)] = feature
    return Experiments(base_url, timeout, experiments, generate, str(path))


GENERATE_KEYS = {"workflow", "parameters", "outputs", "optional", "with_prompt", "model_ids"}
