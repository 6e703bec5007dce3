"""Call a node class the way ComfyUI does: INPUT_TYPES defaults for unset widgets, then FUNCTION."""

from __future__ import annotations

import torch


def node_kwargs(cls, **inputs) -> dict:
    """Every required input plus optional widgets with defaults, overridden by ``inputs``.

    Fails if a required input is neither given nor defaulted, as ComfyUI's validation would.
    """
    spec = cls.INPUT_TYPES()
    kwargs = {}
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            options = value[1] if len(value) > 1 else {}
            if "default" in options:
                kwargs[name] = options["default"]
            elif section == "required" and isinstance(value[0], list) and value[0]:
                kwargs[name] = value[0][0]
    kwargs.update(inputs)
    missing = set(spec.get("required", {})) - set(kwargs)
    assert not missing, f"{cls.__name__}: required inputs {sorted(missing)} neither given nor defaulted"
    return kwargs


def call_node(cls, **inputs):
    """Run the node inside inference mode, as ComfyUI's executor does."""
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**node_kwargs(cls, **inputs))
