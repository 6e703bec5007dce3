"""The progressive recipe: stages read from YAML in the seed team's own key names, checked before anything runs.

```yaml
progressive_stages:
  stage1: {height: 224, width: 176, num_inference_steps: 9, guidance_scale: 2.0}
  stage2: {height: 432, width: 336, num_inference_steps: 16, guidance_scale: 1.0, strength: 0.7}
  stage3: {scale_by: 2.0, num_inference_steps: 16, guidance_scale: 1.0, strength: 0.6}
```

Any number of stages, run in file order. The first generates from noise; every later one resizes
the previous latent (to its ``width`` x ``height`` as ComfyUI's LatentUpscale, which raises a side
below 64 pixels to 64, or by ``scale_by`` as LatentUpscaleBy) and refines it with img2img at
``strength``; a stage's size is the one that resize really gives. EditKit's optional keys: per
stage ``scale_by`` and ``sampler``; at the top ``sampler``, ``shift``, ``strength_convention``
(``denoise``: ComfyUI KSampler's, the default; ``strength``: diffusers' img2img) and ``guidance_convention``
(``comfyui``: ``guidance_scale`` is KSampler's cfg, 1 = no CFG, the default; ``diffusers``: it is
diffusers' Z-Image ``guidance_scale``, 0 = no CFG). Every problem is reported with the stage's name
before a model is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..core import sampling as core
from ..core.errors import EditKitError
from .latents import VAE_SCALE, scaled_size, upscale_size
from .sampler import SIZE_MULTIPLE, cfg_from_diffusers, nearest_valid

STAGE_KEYS = ("height", "width", "num_inference_steps", "guidance_scale", "strength", "scale_by", "sampler")
TOP_KEYS = ("progressive_stages", "sampler", "shift", "strength_convention", "guidance_convention")
GUIDANCE_CONVENTIONS = ("comfyui", "diffusers")
DEFAULT_STEPS = 9
DEFAULT_SHIFT = 3.0
DEFAULT_SAMPLER = "euler_ancestral"

DEFAULT_STAGES_YAML = """\
# Stage 1 composes a small picture; later stages resize the latent and refine it (img2img at 'strength').
sampler: euler_ancestral      # euler or euler_ancestral (a stage may set its own 'sampler')
shift: 3.0                    # Z-Image-Turbo's flow shift
strength_convention: denoise  # denoise: ComfyUI KSampler (steps = model calls); strength: diffusers img2img
guidance_convention: comfyui  # comfyui: guidance_scale is KSampler's cfg (1.0 = no CFG); diffusers: 0.0 = no CFG
progressive_stages:
  stage1: {height: 224, width: 176, num_inference_steps: 9, guidance_scale: 2.0}
  stage2: {height: 432, width: 336, num_inference_steps: 16, guidance_scale: 1.0, strength: 0.7}
  stage3: {height: 864, width: 672, num_inference_steps: 16, guidance_scale: 1.0, strength: 0.6}
"""


@dataclass(frozen=True)
class Stage:
    name: str
    width: int
    height: int
    steps: int
    cfg: float  # ComfyUI/EditKit convention: neg + cfg * (pos - neg), 1 = off
    strength: float | None  # None for the first stage (text-to-image)
    sampler: str

    @property
    def tokens(self) -> int:
        """Image tokens the transformer sees (2x2 latent patches)."""
        return (self.width // (VAE_SCALE * 2)) * (self.height // (VAE_SCALE * 2))


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    shift: float = DEFAULT_SHIFT
    convention: str = "denoise"

    def model_calls(self, stage: Stage) -> int:
        """Transformer calls of a stage (per sample, not counting the CFG branch)."""
        if stage.strength is None or self.convention == "denoise":
            return stage.steps
        return stage.steps - int(max(stage.steps - min(stage.steps * stage.strength, stage.steps), 0))


def _fail(where: str, problem: str) -> EditKitError:
    return EditKitError(f"Progressive stages, {where}: {problem}")


def _number(stage: str, key: str, value, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and float(value) != int(value)):
        kind = "a whole number" if integer else "a number"
        raise _fail(stage, f"'{key}' must be {kind} (got {value!r}).")
    return int(value) if integer else float(value)


def _size(stage: str, key: str, value) -> int:
    pixels = _number(stage, key, value, integer=True)
    if pixels < SIZE_MULTIPLE or pixels % SIZE_MULTIPLE:
        raise _fail(stage, f"{key} {pixels} is not a multiple of {SIZE_MULTIPLE}, which Z-Image needs. "
                           f"The nearest valid {key} is {nearest_valid(pixels)}.")
    return pixels


def _sampler(where: str, value) -> str:
    if value not in core.SAMPLERS:
        raise _fail(where, f"unknown sampler {value!r}; use one of: {', '.join(core.SAMPLERS)}.")
    return value


def load_yaml(text: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EditKitError(f"The progressive stages are not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise EditKitError("The progressive stages YAML must be a mapping with a 'progressive_stages' entry, e.g.\n"
                           + DEFAULT_STAGES_YAML)
    return dict(data)


def parse_recipe(source) -> Recipe:
    """A :class:`Recipe` from YAML text, a mapping, or a :class:`Recipe` (returned as is)."""
    if isinstance(source, Recipe):
        return source
    data = load_yaml(source) if isinstance(source, str) else dict(source)
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise _fail("top level", f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(TOP_KEYS)}.")
    stages_data = data.get("progressive_stages")
    if isinstance(stages_data, list):
        stages_data = {f"stage{i + 1}": s for i, s in enumerate(stages_data)}
    if not isinstance(stages_data, Mapping) or not stages_data:
        raise _fail("top level", "'progressive_stages' must list at least one stage (stage1: {height: ..., "
                                 "width: ..., num_inference_steps: ..., guidance_scale: ...}).")
    default_sampler = _sampler("top level", data.get("sampler", DEFAULT_SAMPLER))
    shift = _number("top level", "shift", data.get("shift", DEFAULT_SHIFT))
    if shift <= 0:
        raise _fail("top level", f"shift must be greater than 0 (got {shift}); Z-Image-Turbo uses 3.0.")
    convention = data.get("strength_convention", "denoise")
    if convention not in core.CONVENTIONS:
        raise _fail("top level", f"unknown strength_convention {convention!r}; use one of: "
                                 f"{', '.join(core.CONVENTIONS)}.")
    guidance_convention = data.get("guidance_convention", "comfyui")
    if guidance_convention not in GUIDANCE_CONVENTIONS:
        raise _fail("top level", f"unknown guidance_convention {guidance_convention!r}; use one of: "
                                 f"{', '.join(GUIDANCE_CONVENTIONS)}.")

    stages: list[Stage] = []
    for name, spec in stages_data.items():
        name = str(name)
        stages.append(_stage(name, spec, stages[-1] if stages else None, default_sampler, guidance_convention,
                             convention))
    return Recipe(stages=tuple(stages), shift=shift, convention=convention)


def _stage(name: str, spec, previous: Stage | None, default_sampler: str, guidance_convention: str,
           convention: str) -> Stage:
    if not isinstance(spec, Mapping):
        raise _fail(name, f"expected a mapping of settings, got {spec!r}.")
    unknown = [k for k in spec if k not in STAGE_KEYS]
    if unknown:
        raise _fail(name, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(STAGE_KEYS)}.")
    has_size = "width" in spec or "height" in spec
    if previous is None:
        if "scale_by" in spec:
            raise _fail(name, "the first stage needs width and height ('scale_by' resizes a previous stage).")
        if "strength" in spec:
            raise _fail(name, "the first stage generates from noise and takes no 'strength'; remove it.")
    elif "strength" not in spec:
        raise _fail(name, "every stage after the first refines the previous one and needs a 'strength' "
                          "(0 < strength <= 1, e.g. 0.6).")
    if "scale_by" in spec:
        if has_size:
            raise _fail(name, "give either width and height or scale_by, not both.")
        factor = _number(name, "scale_by", spec["scale_by"])
        if factor <= 0:
            raise _fail(name, f"scale_by must be greater than 0 (got {factor}).")
        width, height = scaled_size(previous.width // VAE_SCALE, previous.height // VAE_SCALE, factor)
        if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
            raise _fail(name, f"scale_by {factor} turns {previous.width}x{previous.height} into {width}x{height}, "
                              f"which is not a multiple of {SIZE_MULTIPLE}. Give width: {nearest_valid(width)} and "
                              f"height: {nearest_valid(height)} instead.")
    else:
        if "width" not in spec or "height" not in spec:
            missing = "width" if "width" not in spec else "height"
            raise _fail(name, f"'{missing}' is missing (give width and height"
                              f"{'' if previous is None else ', or scale_by'}).")
        width, height = _size(name, "width", spec["width"]), _size(name, "height", spec["height"])
        if previous is not None:  # resized like LatentUpscale, which makes a side below 64 pixels 64
            width, height = upscale_size(width, height)
    if previous is not None and (width < previous.width or height < previous.height):
        raise _fail(name, f"{width}x{height} is smaller than the previous stage's {previous.width}x"
                          f"{previous.height}; stages may only keep or grow the size.")
    steps = _number(name, "num_inference_steps", spec.get("num_inference_steps", DEFAULT_STEPS), integer=True)
    if steps < 1:
        raise _fail(name, f"num_inference_steps must be at least 1 (got {steps}).")
    guidance = _number(name, "guidance_scale", spec.get("guidance_scale", 1.0 if guidance_convention == "comfyui"
                                                         else 0.0))
    if guidance < 0:
        raise _fail(name, f"guidance_scale must not be negative (got {guidance}).")
    cfg = guidance if guidance_convention == "comfyui" else cfg_from_diffusers(guidance)
    strength = None
    if previous is not None:
        strength = _number(name, "strength", spec["strength"])
        if not 0.0 < strength <= 1.0:
            raise _fail(name, f"strength must be greater than 0 and at most 1 (got {strength}).")
        if convention == "strength" and int(max(steps - min(steps * strength, steps), 0)) >= steps:
            raise _fail(name, f"strength {strength} with {steps} steps runs no step in the 'strength' convention; "
                              "raise strength or num_inference_steps.")
    sampler = _sampler(name, spec.get("sampler", default_sampler))
    return Stage(name=name, width=width, height=height, steps=steps, cfg=cfg, strength=strength, sampler=sampler)
