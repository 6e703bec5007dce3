"""The two-stage Kontext-inpaint fine-tune: config, model preparation and the training loop.

Stage 1 trains only ``x_embedder`` (the widened input projection, whose mask-image columns
start silent) so the new conditioning is learnt without disturbing FLUX.1-Fill; stage 2 trains
every parameter. The loss is rectified-flow velocity MSE on the target latent,
``x_t = (1 - t) x0 + t eps`` with target ``eps - x0``, conditioned on the source and mask-image
latents, ``t`` logit-normal as in FLUX training.

Multi-GPU, mixed precision, FSDP and DeepSpeed come from ``accelerate`` (``accelerate launch``
with an accelerate config); nothing here is distributed by hand except which micro-batch each
process reads. Every random draw is derived from (seed, micro-batch index), so a run resumed
from a checkpoint is bit-identical to an uninterrupted one. Stage 2 always starts from the
stage-1 checkpoint on disk, in a straight run and after a resume alike: one code path, and no
re-wrapping of an FSDP-sharded model with a different set of trainable parameters.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...core.errors import EditKitError
from ...core.loading import LazyModel
from ...core.runtime import TorchRuntime
from .. import flow
from ..loading import transformer_source, vae_source
from ..text import text_encoder_source
from . import checkpoint as ckpt
from .conditioning import condition_tokens
from .config import (
    EXPORT_DTYPES,
    LOG_FILE,
    WEIGHT_DTYPES,
    Stage,
    TrainingConfig,
    TrainSettings,
    plan_stages,
)
from .dataset import (
    BatchOrder,
    CachedPairs,
    Encoders,
    build_cache,
    check_cache,
    derive_seed,
    pair_fingerprint,
    scan_dataset,
)
from .widen import ensure_kontext

log = logging.getLogger("EditKit.train")

# --------------------------------------------------------------------------------------
# Stages


def set_trainable(model: torch.nn.Module, stage: int) -> list[torch.nn.Parameter]:
    """Freeze per stage and return the parameters the optimizer gets."""
    model.requires_grad_(stage == 2)
    if stage == 1:
        model.x_embedder.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(settings: TrainSettings, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if settings.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as exc:
            raise EditKitError("train.optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes (CUDA only), "
                               "or use train.optimizer: adafactor.") from exc
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)


def _warmup(steps: int):
    def factor(step: int) -> float:
        return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)

    return factor


# --------------------------------------------------------------------------------------
# Loss


def sample_noise_and_t(shape: tuple[int, ...], seed: int, micro_batch: int, logit_mean: float = 0.0,
                       logit_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``eps`` and logit-normal times ``t`` for one micro-batch, on the CPU (same on every device)."""
    generator = torch.Generator("cpu").manual_seed(derive_seed(seed, "noise", micro_batch))
    noise = torch.randn(shape, generator=generator)
    t = torch.sigmoid(torch.randn(shape[0], generator=generator) * logit_std + logit_mean)
    return noise, t


def flow_matching_loss(model, batch: dict[str, torch.Tensor], noise: torch.Tensor, t: torch.Tensor,
                       guidance: float | None, dtype: torch.dtype) -> torch.Tensor:
    """Velocity MSE on the target latent given source + mask-image conditioning (tensors on one device)."""
    x0 = batch["target"].float()
    b, _, h, w = x0.shape
    device = x0.device
    t4 = t.view(b, 1, 1, 1)
    noisy = (1.0 - t4) * x0 + t4 * noise
    hidden = torch.cat([flow.pack(noisy), condition_tokens(batch["source"], batch["mask"])], dim=-1).to(dtype)
    text = batch["text"].to(dtype)
    prediction = model(
        hidden_states=hidden,
        timestep=t.to(dtype),
        guidance=None if guidance is None else torch.full((b,), float(guidance), device=device),
        pooled_projections=batch["pooled"].to(dtype),
        encoder_hidden_states=text,
        txt_ids=flow.text_ids(text.shape[1], device),
        img_ids=flow.token_ids(h, w, 0, device),
        return_dict=False,
    )[0]
    return F.mse_loss(prediction.float(), flow.pack(noise - x0))


# --------------------------------------------------------------------------------------
# Models


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _local_path(value: str | None, key: str) -> Path | None:
    """A local path, or a Hugging Face id already in the local cache (nothing is downloaded)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(value):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(value, local_files_only=True))
        except Exception as exc:  # offline cache misses raise several hub error types
            raise EditKitError(f"{key} '{value}' is neither a local path nor in the Hugging Face cache. Download it "
                               f"first (huggingface-cli download {value} --local-dir DIR) and set {key} to DIR.") from exc
    raise EditKitError(f"{key}: '{value}' does not exist. Fix the path in the config.")


def _identity(*paths: Path | None) -> list:
    """Names, sizes and dates of the files behind the encoders (for the cache fingerprint)."""
    out = []
    for path in paths:
        if path is None:
            out.append(None)
            continue
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out.append([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    return out


@dataclass
class ModelSources:
    transformer: LazyModel
    encoders: Encoders


def _check_components(folder: Path | None, files: dict[str, Path | None]) -> None:
    """Every encoder has a source before anything is written (they are loaded only when caching)."""
    def has(sub: str) -> bool:
        return folder is not None and (folder / sub).is_dir()

    where = (f"'{folder}' has no {{sub}}/ folder" if folder is not None
             else "model.name_or_path is a single file and model.components_from is not set")
    needs = (("vae", "vae_file", "ae.safetensors"), ("text_encoder", "clip_file", "clip_l.safetensors"),
             ("text_encoder_2", "t5_file", "t5xxl_fp16.safetensors"), ("tokenizer", "clip_tokenizer_dir", None),
             ("tokenizer_2", "t5_tokenizer_dir", None))
    for sub, key, example in needs:
        if files[key] is None and not has(sub):
            hint = f" ({example})" if example else " (a diffusers FLUX.1 folder's tokenizer folder)"
            raise EditKitError(f"No source for the {sub.replace('_', ' ')}: {where.format(sub=sub)}. Set "
                               f"model.components_from to a diffusers FLUX.1 folder, or model.{key}{hint}.")


def resolve_sources(config: TrainingConfig, text_dtype: torch.dtype) -> ModelSources:
    """Where the transformer, VAE and text encoders come from; every path is checked now.

    ``name_or_path`` gives the transformer (a diffusers folder's ``transformer/`` or one file);
    the encoders come from ``components_from`` if set, else from ``name_or_path`` when it is a
    folder, and single files (``vae_file``, ``clip_file``, ...) replace a folder's component.
    """
    m = config.model
    weights_dtype = WEIGHT_DTYPES[config.train.weights_dtype]
    main = _local_path(m.name_or_path, "model.name_or_path")
    if main.is_file() and main.suffix.lower() == ".gguf":
        raise EditKitError(f"model.name_or_path '{main}' is a GGUF file: its weights are quantized and cannot be "
                           "fine-tuned. Use the bf16 .safetensors or the diffusers folder.")
    folder = _local_path(m.components_from, "model.components_from") or (main if main.is_dir() else None)
    files = {key: _local_path(getattr(m, key), f"model.{key}") for key in
             ("vae_file", "clip_file", "t5_file", "clip_tokenizer_dir", "t5_tokenizer_dir")}
    _check_components(folder, files)
    if main.is_dir():
        if not (main / ckpt.TRANSFORMER_DIR / "config.json").is_file():
            raise EditKitError(f"model.name_or_path '{main}' has no transformer/config.json: give a diffusers FLUX.1 "
                               "folder (e.g. FLUX.1-Fill-dev), a checkpoint-<step> folder or a transformer file.")
        transformer = transformer_source(main, None, weights_dtype)
    else:
        transformer = transformer_source(None, main, weights_dtype)
    vae = vae_source(folder, files["vae_file"], torch.float32)
    text = text_encoder_source(folder, files["clip_file"], files["t5_file"], text_dtype,
                               files["clip_tokenizer_dir"], files["t5_tokenizer_dir"])
    component_dirs = [folder / name if folder is not None else None
                      for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")]
    identity = json.dumps(_identity(*component_dirs, *files.values()) + [str(text_dtype)])
    encoders = Encoders(vae=vae, text=text, max_sequence_length=config.train.max_sequence_length, identity=identity)
    return ModelSources(transformer, encoders)


def load_trainable_transformer(source: LazyModel, widen_init: str = "zeros", seed: int = 0) -> torch.nn.Module:
    """A fresh (never shared) copy of the transformer, widened to 192 features if it is FLUX.1-Fill."""
    component = source.derived(f"kontext-train/{uuid.uuid4().hex}", lambda c: c, "transformer for training").get()
    return ensure_kontext(component.module, component.name, init=widen_init, seed=seed)


# --------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    global_step: int  # where this call stopped
    losses: list[float]  # per optimizer step run by this call (this process's micro-batches)
    checkpoints: list[Path]  # written by this call, in order


def _check_locations(data_dir: Path, output_dir: Path, cache_dir: Path) -> None:
    data = data_dir.resolve()
    for what, path in (("--output", output_dir), ("data.cache_dir", cache_dir)):
        resolved = path.resolve()
        if resolved == data or data in resolved.parents:
            raise EditKitError(f"{what} '{path}' is inside the dataset folder '{data_dir}', which training never "
                               "modifies. Choose a folder outside it.")


def _check_resume(state: ckpt.TrainerState, checkpoint: Path, stages: list[Stage]) -> None:
    step = state.global_step
    owner = next((s for s in stages if s.number == state.stage), None)
    if owner is None or not owner.start < step <= owner.end:
        ends = ", ".join(f"stage {s.number}: steps {s.start}-{s.end}" for s in stages)
        raise EditKitError(f"'{checkpoint}' was saved in stage {state.stage} at step {step}, which does not fit this "
                           f"config's stages ({ends}). Resume with the config the run was started with.")


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy host data to the device without waiting for it: a pageable-memory copy to a GPU blocks the host."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class _Run:
    """One invocation: the accelerator, the cached data and the stage loop."""

    def __init__(self, config: TrainingConfig, output_dir: Path, accelerator, pairs: CachedPairs,
                 transformer: LazyModel, stop_at: int):
        self.config = config
        self.settings = config.train
        self.output_dir = output_dir
        self.accelerator = accelerator
        self.pairs = pairs
        self.order = BatchOrder(pairs.sizes, config.train.batch_size, config.train.seed)
        self.transformer = transformer
        self.stop_at = stop_at
        self.result = TrainResult(0, [], [])

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            log.info("step %d/%d  stage %d  loss %.5f  lr %.3g  %.3f s/step", record["step"], record["total"],
                     record["stage"], record["loss"], record["lr"], record["seconds_per_step"])
            with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _save(self, model, stage: Stage, step: int) -> Path:
        state = ckpt.TrainerState(global_step=step, stage=stage.number, bfl_file=ckpt.bfl_file_name(step),
                                  config=self.config.to_dict())
        target = ckpt.checkpoint_dir(self.output_dir, step)
        ckpt.save_checkpoint(self.accelerator, model, target, state, EXPORT_DTYPES[self.settings.export_dtype])
        if self.accelerator.is_main_process:
            ckpt.prune_checkpoints(self.output_dir, self.settings.keep_checkpoints)
            log.info("Saved %s (diffusers transformer/ and %s)", target, state.bfl_file)
        self.result.checkpoints.append(target)
        return target

    def run_stage(self, stage: Stage, start: int, weights_from: Path | None, optimizer_state: Path | None,
                  total: int) -> tuple[int, Path]:
        """Train ``stage`` from global step ``start``; return the step reached and the last checkpoint."""
        s, accelerator = self.settings, self.accelerator
        if weights_from is None:
            model = load_trainable_transformer(self.transformer, self.config.model.widen_init, s.seed)
        else:
            model = load_trainable_transformer(transformer_source(weights_from, None, WEIGHT_DTYPES[s.weights_dtype]))
        params = set_trainable(model, stage.number)
        if s.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        dtype = model.x_embedder.weight.dtype
        guidance = s.guidance if model.config.guidance_embeds else None
        optimizer = make_optimizer(s, params, stage.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(s.lr_warmup_steps))
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        if optimizer_state is not None:
            accelerator.load_state(str(optimizer_state))
        end = min(stage.end, self.stop_at)
        losses = torch.zeros(end - start, device=accelerator.device)
        world, rank, accumulation = accelerator.num_processes, accelerator.process_index, s.gradient_accumulation_steps
        last_log, clock = start, time.perf_counter()
        saved = None
        for step in range(start, end):
            total_loss = torch.zeros((), device=accelerator.device)
            for micro in range(accumulation):
                index = (step * accumulation + micro) * world + rank
                batch = {k: _to_device(v, accelerator.device) for k, v in self.pairs.batch(self.order(index)).items()}
                noise, t = sample_noise_and_t(tuple(batch["target"].shape), s.seed, index, s.logit_mean, s.logit_std)
                sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model)
                with sync:
                    loss = flow_matching_loss(model, batch, _to_device(noise, accelerator.device),
                                              _to_device(t, accelerator.device), guidance, dtype)
                    accelerator.backward(loss / accumulation)
                total_loss += loss.detach()
            if s.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses[step - start] = total_loss / accumulation
            done = step + 1
            if done % s.log_every == 0 or done == end:
                window = accelerator.gather(losses[last_log - start:done - start]).float()
                now = time.perf_counter()  # after the gather, which waited for the device
                self._log({"step": done, "total": total, "stage": stage.number, "loss": float(window.mean()),
                           "lr": scheduler.get_last_lr()[0], "seconds_per_step": (now - clock) / (done - last_log)})
                last_log, clock = done, now
            if done == end or (s.save_every and done % s.save_every == 0):
                saved = self._save(model, stage, done)
        self.result.losses += losses.tolist()
        accelerator.free_memory(model, optimizer, scheduler)
        del model, optimizer, scheduler, params
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return end, saved


def train(config: TrainingConfig, data_dir: str | Path, output_dir: str | Path, resume: str | Path | None = None,
          stop_at_step: int | None = None) -> TrainResult:
    """Run (or continue) the two-stage fine-tune and return where it stopped.

    Everything that can be checked without a GPU (config, paths, every dataset image, the
    resume checkpoint) is checked before anything is written. ``resume`` is a checkpoint
    folder or ``"latest"``; ``stop_at_step`` ends this call after that global step, with a
    checkpoint, e.g. to split a long run into jobs.
    """
    from accelerate import Accelerator

    data_dir, output_dir = Path(data_dir), Path(output_dir)
    s = config.train
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else output_dir / "cache"
    _check_locations(data_dir, output_dir, cache_dir)
    stages = plan_stages(config.model.model_kwargs)
    total = stages[-1].end
    step, resume_dir, resume_state = 0, None, None
    if resume is not None:
        resume_dir = ckpt.resolve_resume(resume, output_dir)
        resume_state = ckpt.read_state(resume_dir)
        _check_resume(resume_state, resume_dir, stages)
        step = resume_state.global_step
        if resume_state.config != config.to_dict():
            log.warning("Resuming with a config that differs from the checkpoint's; the run will not reproduce an "
                        "uninterrupted one exactly.")
    elif ckpt.list_checkpoints(output_dir):
        raise EditKitError(f"'{output_dir}' already holds checkpoints. Continue with --resume latest, or choose an "
                           "empty output folder.")
    stop_at = total if stop_at_step is None else stop_at_step
    if not step < stop_at <= total:
        raise EditKitError(f"Nothing to do: the run is at step {step} and would stop at step {stop_at} (the config "
                           f"trains {total} steps). Raise the step counts or --stop-at-step.")
    cuda = torch.cuda.is_available()
    sources = resolve_sources(config, torch.bfloat16 if cuda else torch.float32)
    pairs = scan_dataset(data_dir, config.data.instructions_file)

    accelerator = Accelerator(mixed_precision=s.mixed_precision, step_scheduler_with_optimizer=False)
    ckpt.install_state_hooks(accelerator)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partials(output_dir)
    fingerprints = [pair_fingerprint(pair, sources.encoders) for pair in pairs]
    paths = build_cache(pairs, cache_dir, sources.encoders, TorchRuntime(accelerator.device),
                        accelerator.process_index, accelerator.num_processes, fingerprints)
    transformer = sources.transformer
    del sources  # the VAE and text encoders are not held while training
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    check_cache(paths, fingerprints)

    run = _Run(config, output_dir, accelerator, CachedPairs(paths, [(p.height // 8, p.width // 8) for p in pairs]),
               transformer, stop_at)
    weights_from = resume_dir
    for stage in stages:
        if step >= stage.end:
            continue
        if step >= stop_at:
            break
        # The optimizer state of a checkpoint saved inside this stage continues; a new stage starts a new one.
        in_stage = resume_state is not None and (resume_state.stage, resume_state.global_step) == (stage.number, step)
        optimizer_state = resume_dir / ckpt.TRAINING_STATE_DIR if in_stage else None
        step, weights_from = run.run_stage(stage, step, weights_from, optimizer_state, total)
    run.result.global_step = step
    accelerator.end_training()
    return run.result
