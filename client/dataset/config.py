"""The dataset factory's configuration: one YAML file, every key documented in ``example.yaml``.

The defaults below are the schema and are exactly what ``example.yaml`` shows (a test compares them),
so the example documents every default; they run as they are from the repository root on the small
example tree shipped in ``client/dataset/example_data`` (``--mock``, or with servers set). A key that
is not here is an error naming the key and the keys allowed at that place, so a typo never silently
falls back to a default. ``--set a.b.c=value``
overrides one key (the value is read as YAML, so ``--set qa.min_psnr=28`` is a number and
``--set services.edit.endpoint=[http://a:8188,http://b:8188]`` a list), as the seed pipeline does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..errors import ClientError

# Keys whose value is a free-form mapping (any keys allowed).
FREE_FORM = {("instructions", "templates"), ("generate", "overrides"), ("decompose", "overrides"),
             ("ray", "runtime_env"), ("ray", "pools")}  # the pools are checked by client.ray_workers.pool_spec

DEFAULTS: dict[str, Any] = {
    "outputs": "outputs",
    "logs": "logs",
    "inputs": {
        "roots": ["client/dataset/example_data"],
        "pattern": "{category}/{id}/{id}.{ext}",
        "extensions": ["png", "jpg", "jpeg", "webp", "bmp"],
        "categories": [],
    },
    "instructions": {
        "files": ["{id}.txt", "{id}.json"],
        "templates": {"物理变化": ["make it look wet after rain", "melt the ice"]},
        "default": [],
    },
    "decompose": {
        "enabled": True,
        "workflow": "qwen_image_layered_decompose",
        "layers": 4,
        "resolution": 640,
        "steps": 50,
        "seed": 0,
        "targets": {"image": "", "layers": "Decompose.layers", "resolution": "Decompose.resolution",
                    "steps": "Decompose.steps", "seed": "Decompose.seed"},
        "overrides": {},
    },
    "generate": {
        "workflow": "flux_fill_inpaint",
        "mask": "decomposition",
        "mask_layer": -1,
        "seed": 0,
        "targets": {"image": "", "instruction": "2.prompt", "seed": "4.seed"},
        "overrides": {},
    },
    "services": {
        "layered": {"endpoint": [], "timeout": 600},
        "edit": {"endpoint": [], "timeout": 600},
        "in_flight": 2,
        "max_failures": 3,
    },
    "ray": {
        "address": "",
        "runtime_env": {},
        "pools": {},
    },
    "export": {
        "validation_percent": 10,
        "include_failed": False,
        "size_multiple": 16,
    },
    "qa": {
        "min_psnr_outside_mask": 30.0,
        "min_ssim_outside_mask": 0.90,
        "near_copy_distance": 2,
        "duplicate_distance": 2,
        "blank_std": 0.02,
        "thumbnail": 160,
    },
}


def _check(node: Any, schema: Any, path: tuple[str, ...]) -> None:
    if not isinstance(schema, dict) or path in FREE_FORM:
        return
    if not isinstance(node, dict):
        raise ClientError(f"config key '{'.'.join(path)}' must be a mapping of: {', '.join(schema)}")
    for key, value in node.items():
        if key not in schema:
            where = ".".join(path) or "the top level"
            raise ClientError(f"unknown config key '{'.'.join((*path, str(key)))}'; allowed at {where}: "
                              f"{', '.join(schema)}")
        _check(value, schema[key], (*path, key))


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("templates", "overrides", "runtime_env"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_set(config: dict, expr: str) -> None:
    """``a.b.c=value`` (value read as YAML) into ``config``; the key must exist in the schema."""
    if "=" not in expr:
        raise ClientError(f"--set '{expr}' is not KEY=VALUE (e.g. --set qa.min_psnr_outside_mask=28)")
    key, raw = expr.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node, schema = config, DEFAULTS
    for i, part in enumerate(parts):
        free = tuple(parts[:i]) in FREE_FORM
        if not free and (not isinstance(schema, dict) or part not in schema):
            where = ".".join(parts[:i]) or "the top level"
            allowed = ", ".join(schema) if isinstance(schema, dict) else "(nothing: it is a value)"
            raise ClientError(f"--set: unknown config key '{'.'.join(parts[:i + 1])}'; allowed at {where}: {allowed}")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            schema = schema.get(part, {}) if isinstance(schema, dict) and not free else {}


def load_config(path: Path | None, sets: list[str] | None = None) -> dict:
    """Defaults ← the YAML file ← ``--set`` overrides, checked against the schema."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ClientError(f"cannot read the config '{path}': {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ClientError(f"the config '{path}' is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ClientError(f"the config '{path}' must be a mapping of keys (see client/dataset/example.yaml)")
        _check(data, DEFAULTS, ())
    config = _merge(DEFAULTS, data)
    for expr in sets or []:
        apply_set(config, expr)
    _check(config, DEFAULTS, ())
    for name in ("layered", "edit"):
        endpoint = config["services"][name]["endpoint"]
        if isinstance(endpoint, str):
            config["services"][name]["endpoint"] = [endpoint] if endpoint else []
    if config["generate"]["mask"] not in ("decomposition", "ben2", "none"):
        raise ClientError(f"generate.mask must be decomposition, ben2 or none (got {config['generate']['mask']!r})")
    return config
