"""The training config: the YAML the CLI reads, validated into dataclasses with defaults.

The seed project's keys (``model.arch``, ``model.name_or_path``, ``model.model_kwargs.{
kontext_inpaint_mode, two_stage_training, stage1_steps, stage1_lr, stage2_lr}``) are accepted
exactly as written; unknown keys are errors that name the key, so a typo never trains silently
with a default.
"""

from __future__ import annotations

import contextlib
import importlib.util
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import torch

from ...core.errors import EditKitError
from .widen import INIT_CHOICES

ARCH = "flux_fill_inpaint"
OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EXPORT_DTYPES = {"same": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIXED_PRECISION = ("no", "bf16")
LOG_FILE = "train_log.jsonl"


# --------------------------------------------------------------------------------------
# Config


@dataclass
class StageSettings:
    """``model.model_kwargs``: the seed config's keys (plus ``stage2_steps``)."""

    kontext_inpaint_mode: bool = True
    two_stage_training: bool = True
    stage1_steps: int = 1000
    stage1_lr: float = 1e-4
    stage2_steps: int = 2000
    stage2_lr: float = 5e-5


@dataclass
class ModelSettings:
    arch: str = ARCH
    name_or_path: str | None = None  # diffusers folder, HF id in the local cache, or one transformer file
    components_from: str | None = None  # diffusers folder for VAE/text encoders when name_or_path is a file
    vae_file: str | None = None
    clip_file: str | None = None
    t5_file: str | None = None
    clip_tokenizer_dir: str | None = None
    t5_tokenizer_dir: str | None = None
    widen_init: str = "zeros"
    model_kwargs: StageSettings = field(default_factory=StageSettings)


@dataclass
class TrainSettings:
    seed: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_warmup_steps: int = 0
    guidance: float = 30.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weights_dtype: str = "float32"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_sequence_length: int = 512
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 0
    export_dtype: str = "same"


@dataclass
class DataSettings:
    instructions_file: str | None = None
    cache_dir: str | None = None


@dataclass
class TrainingConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(value, kind, key: str):
    """``value`` as ``kind``, accepting what YAML gives (PyYAML reads ``1e-4`` as a string)."""
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
    if optional:
        if value is None:
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is str and isinstance(value, bool):
        raise EditKitError(f"Config key '{key}' must be text; got {value!r} because YAML reads a bare no/yes/off/on "
                           f"as a boolean. Quote it, e.g. {key.rsplit('.', 1)[-1]}: \"no\".")
    raise EditKitError(f"Config key '{key}' must be {kind.__name__}{' or null' if optional else ''}; "
                       f"got {value!r}.")


def _build(cls, values, prefix: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise EditKitError(f"Config key '{prefix.rstrip('.') or 'top level'}' must be a mapping of settings; "
                           f"got {values!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise EditKitError(f"Unknown config key '{prefix}{key}'. Known keys here: {', '.join(sorted(known))}.")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if is_dataclass(kind):
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise EditKitError(message)


def validate_config(config: TrainingConfig) -> TrainingConfig:
    """Check values and combinations; every message names the key and the allowed values."""
    m, k, t = config.model, config.model.model_kwargs, config.train
    _require(m.arch == ARCH, f"model.arch is '{m.arch}'; this trainer trains '{ARCH}' (Kontext-inpaint from "
                             "FLUX.1-Fill). Set model.arch: flux_fill_inpaint.")
    _require(bool(m.name_or_path), "model.name_or_path is missing: give the FLUX.1-Fill-dev diffusers folder (or a "
                                   "trained Kontext-inpaint checkpoint's transformer file or folder).")
    _require(k.kontext_inpaint_mode, "model.model_kwargs.kontext_inpaint_mode is false, but this trainer only trains "
                                     "the Kontext-inpaint model. Set it to true.")
    _require(m.widen_init in INIT_CHOICES, f"model.widen_init must be one of {INIT_CHOICES}; got '{m.widen_init}'.")
    for key in ("stage1_steps", "stage2_steps"):
        _require(getattr(k, key) >= 0, f"model.model_kwargs.{key} must be 0 or more.")
    for key in ("stage1_lr", "stage2_lr"):
        _require(getattr(k, key) > 0, f"model.model_kwargs.{key} must be greater than 0.")
    _require(plan_stages(k) != [], "Nothing to train: model.model_kwargs.stage1_steps and stage2_steps are 0 "
                                   "(stage 1 also needs two_stage_training: true).")
    _require(t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {OPTIMIZERS}; got '{t.optimizer}'.")
    _require(t.optimizer != "adamw8bit" or importlib.util.find_spec("bitsandbytes") is not None,
             "train.optimizer 'adamw8bit' needs bitsandbytes, which is not installed: pip install bitsandbytes "
             "(CUDA only), or use train.optimizer: adafactor (factored, no extra package).")
    _require(t.weights_dtype in WEIGHT_DTYPES, f"train.weights_dtype must be one of {tuple(WEIGHT_DTYPES)}.")
    _require(t.mixed_precision in MIXED_PRECISION, f"train.mixed_precision must be one of {MIXED_PRECISION}.")
    _require(t.export_dtype in EXPORT_DTYPES, f"train.export_dtype must be one of {tuple(EXPORT_DTYPES)}.")
    for key in ("batch_size", "gradient_accumulation_steps", "log_every"):
        _require(getattr(t, key) >= 1, f"train.{key} must be 1 or more.")
    for key in ("save_every", "keep_checkpoints", "lr_warmup_steps", "weight_decay", "max_grad_norm", "seed"):
        _require(getattr(t, key) >= 0, f"train.{key} must be 0 or more.")
    _require(t.logit_std > 0, "train.logit_std must be greater than 0.")
    _require(1 <= t.max_sequence_length <= 512, "train.max_sequence_length must be between 1 and 512 (T5 tokens).")
    return config


def parse_config(values: dict | None) -> TrainingConfig:
    """A validated config from a mapping shaped like the YAML file; unknown keys are errors."""
    return validate_config(_build(TrainingConfig, values, ""))


def _apply_override(values: dict, override: str) -> None:
    import yaml

    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise EditKitError(f"Override '{override}' is not KEY=VALUE (e.g. train.batch_size=2).")
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise EditKitError(f"Override '{override}': '{part}' is not a section of the config.")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainingConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply KEY=VALUE overrides."""
    import yaml

    values: dict = {}
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise EditKitError(f"Cannot read the config file '{path}' ({exc}).") from exc
        except yaml.YAMLError as exc:
            raise EditKitError(f"The config file '{path}' is not valid YAML: {exc}".replace("\n", " ")) from exc
        if not isinstance(values, dict):
            raise EditKitError(f"The config file '{path}' must hold a mapping (model:, train:, data:).")
    for override in overrides:
        _apply_override(values, override)
    return parse_config(values)


@dataclass(frozen=True)
class Stage:
    number: int  # 1: x_embedder only; 2: every parameter
    start: int  # first global step (0-based)
    end: int  # global step count when the stage is done
    lr: float


def plan_stages(settings: StageSettings) -> list[Stage]:
    stages, step = [], 0
    if settings.two_stage_training and settings.stage1_steps > 0:
        stages.append(Stage(1, 0, settings.stage1_steps, settings.stage1_lr))
        step = settings.stage1_steps
    if settings.stage2_steps > 0:
        stages.append(Stage(2, step, step + settings.stage2_steps, settings.stage2_lr))
    return stages
