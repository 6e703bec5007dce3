"""Kontext-inpaint training checkpoints: atomic writes, the two exported model forms, and resume.

A checkpoint folder ``checkpoint-<step>`` holds

* ``transformer/``: the diffusers FluxTransformer2DModel (config + safetensors shards), what
  ``from_pretrained`` and EditKit's loader read, and what a resumed run starts from;
* ``flux1-kontext-inpaint-step<step>.safetensors``: the same weights as one BFL-layout file
  (192 input features), which ComfyUI users drop into ``models/diffusion_models``;
* ``training_state/``: accelerate's ``save_state`` output (optimizer, LR scheduler, RNG; under
  FSDP/DeepSpeed also the sharded model), so multi-GPU state is saved the way accelerate
  expects rather than by hand;
* ``trainer_state.json``: global step, stage and the config; written last.

The whole folder is first written under a hidden ``.<name>.partial`` name next to the target
and renamed only when complete, so a failure (full disk, a crash, Ctrl-C) never leaves
something that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...core.errors import EditKitError
from ..layout import diffusers_transformer_to_bfl

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"
TRANSFORMER_DIR = "transformer"
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
FORMAT = "editkit-kontext-inpaint-checkpoint-1"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass
class TrainerState:
    """What a resumed run needs besides weights and optimizer: where it stopped, and under what config."""

    global_step: int
    stage: int  # the stage whose optimizer state is in training_state/
    bfl_file: str
    config: dict
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def bfl_file_name(step: int) -> str:
    return f"flux1-kontext-inpaint-step{step:06d}.safetensors"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"{PREFIX}{step:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str | Path, output_dir: Path) -> Path:
    """``latest`` (the newest checkpoint in ``output_dir``) or a checkpoint folder."""
    if str(resume) == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise EditKitError(f"--resume latest: there is no checkpoint in '{output_dir}'. Start without --resume, "
                               "or give the checkpoint folder to continue from.")
        return found[-1]
    return Path(resume)


def read_state(checkpoint: Path) -> TrainerState:
    """The trainer state of a complete checkpoint, with a clear error for anything else."""
    if not checkpoint.is_dir():
        raise EditKitError(f"The checkpoint folder '{checkpoint}' does not exist. Give a 'checkpoint-<step>' folder "
                           "from a previous run's output, or --resume latest.")
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        raise EditKitError(f"'{checkpoint}' is not a complete Kontext-inpaint training checkpoint (no {STATE_FILE}). "
                           "Resume from a 'checkpoint-<step>' folder written by this trainer.")
    try:
        data = json.loads(state_file.read_text(encoding="utf-8"))
        state = TrainerState(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise EditKitError(f"Cannot read '{state_file}' ({exc}). Resume from another checkpoint.") from exc
    if state.format != FORMAT:
        raise EditKitError(f"'{checkpoint}' was written in format '{state.format}', this trainer reads '{FORMAT}'.")
    for needed in (TRANSFORMER_DIR, TRAINING_STATE_DIR):
        if not (checkpoint / needed).is_dir():
            raise EditKitError(f"'{checkpoint}' has no {needed}/ folder: it is damaged. Resume from another checkpoint.")
    return state


def remove_partials(output_dir: Path) -> None:
    """Delete leftovers of saves that a killed process could not clean up."""
    if output_dir.is_dir():
        for path in output_dir.glob(f".{PREFIX}*"):
            if path.name.endswith((".partial", ".old")):
                shutil.rmtree(path, ignore_errors=True)


def install_state_hooks(accelerator) -> None:
    """Keep whole-model weights out of ``training_state/``: ``transformer/`` already holds them.

    Without sharding, accelerate would otherwise write a third full copy of the 12B weights
    into every checkpoint. (Under FSDP/DeepSpeed accelerate saves model shards itself.)
    """
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def write_transformer_folder(model, state_dict: dict[str, torch.Tensor], folder: Path,
                             max_shard_size: str = "10GB") -> None:
    """A diffusers ``transformer/`` folder from a (possibly gathered) full state dict.

    Written from the state dict rather than with ``save_pretrained`` so that FSDP/DeepSpeed
    runs, where only the gathered dict holds full tensors, use the same code.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    folder.mkdir(parents=True)
    model.save_config(str(folder))
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state_dict[name].detach().to("cpu").contiguous() for name in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True), encoding="utf-8")


def write_bfl_file(state_dict: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> None:
    """One BFL-layout safetensors file (what ComfyUI's and EditKit's single-file loaders read).

    Tensors are brought to the CPU one by one before the layout conversion concatenates the fused
    projections, so a save never needs several GB of extra GPU memory in the middle of a run.
    """
    on_cpu = {}
    for key, tensor in state_dict.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        on_cpu[key] = tensor.detach().to("cpu")
    tensors = {key: tensor.contiguous() for key, tensor in diffusers_transformer_to_bfl(on_cpu).items()}
    save_file(tensors, str(path), metadata={"format": "pt", "editkit_model": "kontext-inpaint",
                                            "in_channels": str(tensors["img_in.weight"].shape[1])})


def _move_into_place(partial: Path, target: Path) -> None:
    if not target.exists():
        os.replace(partial, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, model, target: Path, state: TrainerState, export_dtype: torch.dtype | None) -> Path:
    """Write a complete checkpoint to ``target`` atomically (every process calls this).

    ``export_dtype`` casts only the BFL file (e.g. bf16 for ComfyUI); ``transformer/`` keeps
    the training weights exactly, so resuming from it continues bit-for-bit.
    """
    partial = target.with_name(f".{target.name}.partial")
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        state_dict = accelerator.get_state_dict(model)  # a collective under FSDP / DeepSpeed ZeRO-3
        accelerator.save_state(str(partial / TRAINING_STATE_DIR))  # every process writes its RNG file
        accelerator.wait_for_everyone()  # ... before the folder is renamed under it
        if main:
            write_transformer_folder(accelerator.unwrap_model(model), state_dict, partial / TRANSFORMER_DIR)
            write_bfl_file(state_dict, partial / state.bfl_file, export_dtype)
            (partial / STATE_FILE).write_text(state.to_json(), encoding="utf-8")
            _move_into_place(partial, target)
    except BaseException:
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return target


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 keeps all)."""
    if keep > 0:
        for path in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
