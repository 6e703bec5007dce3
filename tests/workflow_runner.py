"""A small executor for API-format workflows, for machines without ComfyUI.

It follows ComfyUI's own semantics (research/comfyui.md §6b): inputs are constants or links
``[node_id, output_index]``; every node must have a known ``class_type``; only output nodes
(``OUTPUT_NODE``) and their ancestors run, in topological order; before running, each needed
node's inputs are validated the way ``execution.validate_prompt`` does (required inputs
present, link types match, numbers within min/max, combo values in their lists). EditKit nodes
are called through ``INPUT_TYPES`` and ``FUNCTION`` exactly like ComfyUI calls them.

The few native nodes the bundled workflows use have stand-ins with ComfyUI's behaviour
(LoadImage's alpha → MASK rule, SaveImage's file naming); their input specs come from ComfyUI
0.3.64's ``/object_info`` (``tests/data/native_node_specs.json``), so a workflow that passes
here passes ComfyUI's validation too. With ``COMFYUI_ROOT`` set, the tests run the same
workflows through ComfyUI's real executor instead (``comfy_inprocess.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DATA = Path(__file__).resolve().parent / "data"
# Workflow tests shrink the example pictures (and width/height widgets) by this factor, sides multiples of 16.
SMALL_FACTOR = 6


def small_size(width: int, height: int) -> tuple[int, int]:
    """The test size of a picture or canvas: a sixth of each side, rounded to a multiple of 16 (at least 16)."""
    return (max(16, round(width / SMALL_FACTOR / 16) * 16), max(16, round(height / SMALL_FACTOR / 16) * 16))


class WorkflowError(Exception):
    """The workflow is invalid (as ComfyUI's 400 answer) or a node failed (as execution_error)."""

    def __init__(self, message: str, node_id: str | None = None, node_errors: dict | None = None):
        super().__init__(message)
        self.node_id = node_id
        self.node_errors = node_errors or {}


# --------------------------------------------------------------------------------------
# Native node stand-ins


def _load_native_specs() -> dict:
    with open(DATA / "native_node_specs.json", encoding="utf-8") as handle:
        return json.load(handle)


class _Native:
    SPEC: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return cls.SPEC["input"]


class LoadImage(_Native):
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    input_dir: Path = Path(".")

    @classmethod
    def INPUT_TYPES(cls):
        files = sorted(p.name for p in cls.input_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        return {"required": {"image": (files, {"image_upload": True})}}

    def load_image(self, image):
        with Image.open(self.input_dir / image) as picture:
            rgb = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
            if "A" in picture.getbands():
                alpha = np.asarray(picture.getchannel("A"), dtype=np.float32) / 255.0
                mask = 1.0 - torch.from_numpy(alpha)
            else:
                mask = torch.zeros(64, 64)
        return torch.from_numpy(rgb)[None], mask[None]


class SaveImage(_Native):
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    output_dir: Path = Path(".")
    kind = "output"

    def save_images(self, images, filename_prefix="ComfyUI"):
        folder = self.output_dir / Path(filename_prefix).parent
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(filename_prefix).name
        counter = 1 + len(list(folder.glob(f"{stem}_*_.png")))
        results = []
        for image in images:
            array = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            name = f"{stem}_{counter:05}_.png"
            Image.fromarray(array).save(folder / name)
            results.append({"filename": name, "subfolder": str(Path(filename_prefix).parent), "type": self.kind})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    kind = "temp"

    def save_images(self, images, filename_prefix="ComfyUI_temp"):
        return super().save_images(images, "preview/" + filename_prefix)


class InvertMask(_Native):
    RETURN_TYPES = ("MASK",)
    FUNCTION = "invert"

    def invert(self, mask):
        return (1.0 - mask,)


class MaskToImage(_Native):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "mask_to_image"

    def mask_to_image(self, mask):
        return (mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3),)


class FluxGuidance(_Native):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"

    def append(self, conditioning, guidance):
        return ([[t, {**extra, "guidance": guidance}] for t, extra in conditioning],)


class ConditioningZeroOut(_Native):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "zero_out"

    def zero_out(self, conditioning):
        out = []
        for tensor, extra in conditioning:
            extra = dict(extra)
            if extra.get("pooled_output") is not None:
                extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
            out.append([torch.zeros_like(tensor), extra])
        return (out,)


class ImageBatch(_Native):
    """Two pictures as one batch; the second is centre-cropped to the first's aspect and resized bilinearly."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "batch"

    def batch(self, image1, image2):
        if image1.shape[1:] != image2.shape[1:]:
            height, width = image1.shape[1:3]
            old_h, old_w = image2.shape[1:3]
            old_aspect, new_aspect = old_w / old_h, width / height
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect else 0
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect else 0
            crop = image2.movedim(-1, 1)[:, :, y:old_h - y, x:old_w - x]
            image2 = torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear").movedim(1, -1)
        return (torch.cat((image1, image2), dim=0),)


NATIVE_STANDINS = {
    cls.__name__: cls
    for cls in (LoadImage, SaveImage, PreviewImage, InvertMask, MaskToImage, FluxGuidance, ConditioningZeroOut,
                ImageBatch)
}


def _bind_specs() -> None:
    specs = _load_native_specs()
    for name, cls in NATIVE_STANDINS.items():
        cls.SPEC = specs[name]


_bind_specs()


# --------------------------------------------------------------------------------------
# Validation and execution


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _types_match(received: str, expected: str) -> bool:
    if received == expected or expected == "*":
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))


@dataclass
class RunResult:
    outputs: dict = field(default_factory=dict)  # node id -> tuple of outputs
    ui: dict = field(default_factory=dict)  # node id -> ui dict
    executed: list = field(default_factory=list)


class WorkflowRunner:
    """Validate and run API-format prompts with EditKit's nodes plus native stand-ins."""

    def __init__(self, node_classes: dict, input_dir: Path, output_dir: Path):
        self.classes = {**NATIVE_STANDINS, **node_classes}
        LoadImage.input_dir = Path(input_dir)
        SaveImage.output_dir = Path(output_dir)

    # -- validation, mirroring execution.validate_prompt --------------------------------

    def _input_spec(self, cls) -> dict:
        spec = cls.INPUT_TYPES()
        merged = {}
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                merged[name] = (section, value)
        return merged

    def _validate_node(self, prompt: dict, node_id: str, seen: set) -> list[str]:
        if node_id in seen:
            return []
        seen.add(node_id)
        node = prompt[node_id]
        cls = self.classes[node["class_type"]]
        errors = []
        inputs = node.get("inputs", {})
        for name, (section, spec) in self._input_spec(cls).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if name not in inputs:
                if section == "required":
                    errors.append(f"node {node_id} ({node['class_type']}): required input '{name}' missing")
                continue
            value = inputs[name]
            if _is_link(value):
                source_id, index = value
                if source_id not in prompt:
                    errors.append(f"node {node_id}: input '{name}' links to missing node {source_id}")
                    continue
                source_cls = self.classes[prompt[source_id]["class_type"]]
                if index >= len(source_cls.RETURN_TYPES):
                    errors.append(f"node {node_id}: input '{name}' links to output {index} of node {source_id}, "
                                  f"which has {len(source_cls.RETURN_TYPES)} outputs")
                    continue
                received = source_cls.RETURN_TYPES[index]
                expected = "COMBO" if isinstance(kind, list) else kind
                if not _types_match(received, expected):
                    errors.append(f"node {node_id}: input '{name}' gets {received}, expects {expected}")
                errors += self._validate_node(prompt, source_id, seen)
                continue
            if isinstance(kind, list):
                if value not in kind:
                    errors.append(f"node {node_id}: '{name}' value {value!r} not in {kind[:20]}")
            elif kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    errors.append(f"node {node_id}: '{name}' value {value!r} is not a number")
                    continue
                if kind == "INT" and float(value) != int(value):
                    errors.append(f"node {node_id}: '{name}' value {value!r} is not an integer")
                if "min" in options and value < options["min"]:
                    errors.append(f"node {node_id}: '{name}' value {value} smaller than min of {options['min']}")
                if "max" in options and value > options["max"]:
                    errors.append(f"node {node_id}: '{name}' value {value} bigger than max of {options['max']}")
            elif kind == "STRING" and not isinstance(value, str):
                errors.append(f"node {node_id}: '{name}' value {value!r} is not a string")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                errors.append(f"node {node_id}: '{name}' value {value!r} is not a boolean")
        return errors

    def validate(self, prompt: dict) -> list[str]:
        """Output node ids to run; raises WorkflowError like ComfyUI's HTTP 400."""
        for node_id, node in prompt.items():
            if "class_type" not in node:
                raise WorkflowError(f"node {node_id} is missing the class_type property", node_id)
            if node["class_type"] not in self.classes:
                raise WorkflowError(f"Cannot execute because node {node['class_type']} does not exist.", node_id)
        outputs = [i for i, n in prompt.items() if getattr(self.classes[n["class_type"]], "OUTPUT_NODE", False)]
        if not outputs:
            raise WorkflowError("Prompt has no outputs")
        errors = []
        seen: set = set()
        for node_id in outputs:
            errors += self._validate_node(prompt, node_id, seen)
        if errors:
            raise WorkflowError("Prompt outputs failed validation:\n" + "\n".join(errors))
        return outputs

    # -- execution ----------------------------------------------------------------------

    def _order(self, prompt: dict, outputs: list[str]) -> list[str]:
        order: list[str] = []
        state: dict[str, str] = {}

        def visit(node_id: str) -> None:
            if state.get(node_id) == "done":
                return
            if state.get(node_id) == "visiting":
                raise WorkflowError(f"dependency cycle at node {node_id}", node_id)
            state[node_id] = "visiting"
            for value in prompt[node_id].get("inputs", {}).values():
                if _is_link(value):
                    visit(value[0])
            state[node_id] = "done"
            order.append(node_id)

        for node_id in outputs:
            visit(node_id)
        return order

    def run(self, prompt: dict) -> RunResult:
        outputs = self.validate(prompt)
        result = RunResult()
        for node_id in self._order(prompt, outputs):
            node = prompt[node_id]
            cls = self.classes[node["class_type"]]
            kwargs = {}
            for name, value in node.get("inputs", {}).items():
                kwargs[name] = result.outputs[value[0]][value[1]] if _is_link(value) else value
            try:
                with torch.inference_mode():  # as ComfyUI's executor runs every node
                    value = getattr(cls(), cls.FUNCTION)(**kwargs)
            except Exception as exc:
                raise WorkflowError(f"node {node_id} ({node['class_type']}) failed: {exc}", node_id) from exc
            if isinstance(value, dict):
                result.ui[node_id] = value.get("ui", {})
                value = tuple(value.get("result", ()))
            result.outputs[node_id] = tuple(value)
            result.executed.append(node_id)
        return result
