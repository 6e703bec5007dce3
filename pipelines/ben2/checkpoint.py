"""Reading, checking and writing BEN2 checkpoints.

Two published layouts are accepted:

* ``.safetensors`` — a flat state dict (``model.safetensors`` on the PramaLLC/BEN2 model page);
* ``.pth`` / ``.pt`` / ``.ckpt`` — a torch pickle whose weights sit under ``model_state_dict``
  (``BEN2_Base.pth``, a training checkpoint that also carries optimizer state). It is read
  with ``weights_only=True``: a file that needs anything beyond tensors and plain
  containers is refused, so no code from a model file ever runs.

The network's size is read off the tensor shapes (so the tests' tiny checkpoints load
through the same path as the real one), then the file must match that network exactly:
any missing, unexpected or mis-shaped tensor is reported by name. The one tolerated gap is
the ``sideout*`` convolutions, training-only heads that some converted copies drop.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections import Counter
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..core.errors import ModelFileError
from .config import BEN2Config
from .model import BEN2Base
from .swin import relative_position_index

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt")

EXPECTED_FILE = (
    "a BEN2 Base checkpoint from the PramaLLC/BEN2 model page: 'model.safetensors' (flat state dict) or "
    "'BEN2_Base.pth' (weights under 'model_state_dict'), placed in ComfyUI's models/background_removal folder"
)

# Heads used only as training losses; absent from some converted copies, never evaluated.
_OPTIONAL_PREFIXES = ("sideout",)
_LISTED = 6  # how many offending names an error message spells out per category


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a BEN2 file (either layout), on the CPU, unvalidated."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except (safetensors.SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(path, f"Cannot read this safetensors file ({exc})", EXPECTED_FILE) from exc
    if suffix in PICKLE_SUFFIXES:
        return _unwrap(path, _load_pickle(path))
    raise ModelFileError(
        path, f"Unsupported file type '{suffix}'", f"{EXPECTED_FILE} (.safetensors, .pth, .pt or .ckpt)"
    )


def _load_pickle(path: Path):
    # Memory-map zip-format files: the 1.1 GB training checkpoint is mostly optimizer state
    # that is then never paged in.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        # torch's message is a long lecture; keep the line that names the problem.
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        detail = detail.split(" was not an allowed global")[0]
        if "Unsupported global" in detail:
            raise ModelFileError(
                path,
                f"This file stores Python objects besides tensors ({detail}); EditKit only loads plain weights "
                "(torch.load with weights_only=True) and never runs code from model files",
                EXPECTED_FILE,
            ) from exc
        raise ModelFileError(path, f"Cannot read this file as a torch checkpoint ({detail})", EXPECTED_FILE) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelFileError(path, f"Cannot read this file as a torch checkpoint ({exc})", EXPECTED_FILE) from exc


def _unwrap(path: Path, loaded) -> dict[str, torch.Tensor]:
    """Find the flat ``{name: tensor}`` dict inside a loaded pickle."""
    if isinstance(loaded, dict):
        for key in ("model_state_dict", "state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelFileError(
            path,
            "No state dict found in this file (expected a dict of tensors, or one under 'model_state_dict')",
            EXPECTED_FILE,
        )
    if all(k.startswith("module.") for k in loaded):  # saved from DataParallel / DDP
        loaded = {k[len("module.") :]: v for k, v in loaded.items()}
    return dict(loaded)


def _most_common(values) -> int:
    return Counter(values).most_common(1)[0][0]


def infer_config(state_dict: dict[str, torch.Tensor]) -> BEN2Config | None:
    """The network size implied by the tensor shapes, or ``None`` if the keys are not BEN2's.

    Sizes that many tensors share are read by majority, so one damaged tensor is reported
    as such instead of changing the inferred size. Decoder head counts and pooling ratios
    leave no trace in shapes; they keep the published values.
    """

    def shapes(suffix: str, prefix: str = "backbone.") -> list[torch.Size]:
        return [v.shape for k, v in state_dict.items() if k.startswith(prefix) and k.endswith(suffix)]

    try:
        embed_dim = state_dict["backbone.patch_embed.proj.weight"].shape[0]
        depths, heads = [], []
        for stage in range(4):
            pattern = re.compile(rf"backbone\.layers\.{stage}\.blocks\.(\d+)\.norm1\.weight")
            depths.append(len({int(m.group(1)) for k in state_dict if (m := pattern.fullmatch(k))}))
            tables = shapes(".attn.relative_position_bias_table", f"backbone.layers.{stage}.")
            heads.append(_most_common(s[1] for s in tables))
        table_rows = _most_common(s[0] for s in shapes(".attn.relative_position_bias_table"))
        return BEN2Config(
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(heads),
            window_size=(math.isqrt(table_rows) + 1) // 2,
            mlp_ratio=_most_common(s[0] // s[1] for s in shapes(".mlp.fc1.weight")),
            decoder_dim=state_dict["shallow.0.weight"].shape[0],
            head_hidden_dim=state_dict["insmask_head.0.weight"].shape[0],
        )
    except (KeyError, IndexError, ValueError, ZeroDivisionError):
        return None


def _foreign_hint(state_dict: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("bb.layers.") for k in state_dict):
        return (
            " It looks like a BiRefNet checkpoint: load it with ComfyUI's own 'Load Background Removal Model' "
            "node instead."
        )
    return ""


def _mismatch_report(state_dict: dict[str, torch.Tensor], config: BEN2Config) -> tuple[int, str]:
    """Number of differences from the network of ``config``, and a human list of them."""
    with torch.device("meta"):
        expected = BEN2Base(config).state_dict()
    missing = [k for k in expected if k not in state_dict and not k.startswith(_OPTIONAL_PREFIXES)]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} [file {tuple(state_dict[k].shape)}, BEN2 {tuple(v.shape)}]"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    wrong_kind = [
        f"{k} [{state_dict[k].dtype}]"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].is_floating_point() != v.is_floating_point()
    ]
    parts, count = [], 0
    for label, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("with the wrong shape", misshaped),
        ("with the wrong kind of values (integer vs float)", wrong_kind),
    ):
        count += len(names)
        if names:
            shown = ", ".join(names[:_LISTED]) + (
                f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
            )
            parts.append(f"{len(names)} tensors {label}: {shown}")
    return count, "; ".join(parts)


def validate_state_dict(
    state_dict: dict[str, torch.Tensor], path: str | Path = "checkpoint", config: BEN2Config | None = None
) -> BEN2Config:
    """Check ``state_dict`` against the BEN2 network it implies (or ``config``); return that config.

    Raises :class:`ModelFileError` naming every missing, unexpected or mis-shaped tensor.
    """
    if config is None:
        # A single damaged tensor can mislead the size inference, so the published size is
        # always a candidate too; the error describes whichever candidate fits best.
        candidates = list(dict.fromkeys(c for c in (infer_config(state_dict), BEN2Config()) if c is not None))
    else:
        candidates = [config]
    reports = [(_mismatch_report(state_dict, c), c) for c in candidates]
    (problems, report), config = min(reports, key=lambda item: item[0][0])
    if problems:
        raise ModelFileError(path, f"Not a BEN2 Base checkpoint: {report}.{_foreign_hint(state_dict)}", EXPECTED_FILE)
    index = relative_position_index(config.window_size)
    for key, tensor in state_dict.items():
        if key.endswith("relative_position_index") and not torch.equal(tensor.long(), index):
            raise ModelFileError(
                path, f"Corrupted BEN2 checkpoint: '{key}' does not hold the fixed window index table", EXPECTED_FILE
            )
    return config


def load_ben2(path: str | Path, dtype: torch.dtype = torch.float32) -> BEN2Base:
    """Read, validate and load a BEN2 file into a CPU model in eval mode with weights in ``dtype``."""
    state_dict = read_state_dict(path)
    config = validate_state_dict(state_dict, path)
    with torch.device("meta"):
        model = BEN2Base(config)
    expected = model.state_dict()
    weights = {}
    for key, meta in expected.items():
        tensor = state_dict.get(key)
        if tensor is None:  # an optional training-only head the file left out
            tensor = torch.zeros(meta.shape, dtype=dtype)
        # Own copies (not views into a memory-mapped file), floats in the compute dtype.
        weights[key] = tensor.to(dtype=dtype if meta.is_floating_point() else meta.dtype, copy=True)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def save_ben2_checkpoint(model_or_state_dict: BEN2Base | dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write weights in a published BEN2 layout chosen by the file extension.

    ``.safetensors`` → a flat state dict; ``.pth``/``.pt``/``.ckpt`` → ``{"model_state_dict": ...}``
    like ``BEN2_Base.pth``.
    """
    path = Path(path)
    state_dict = (
        model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    )
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in SAFETENSORS_SUFFIXES:
        safetensors.torch.save_file(state_dict, str(path), metadata={"format": "pt"})
    elif suffix in PICKLE_SUFFIXES:
        torch.save({"model_state_dict": state_dict}, path)
    else:
        raise ValueError(f"Unsupported BEN2 checkpoint extension '{suffix}' (use .safetensors or .pth)")
    return path
