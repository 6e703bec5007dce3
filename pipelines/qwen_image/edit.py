"""The Qwen-Image-Edit(-2509, -2511) edit on the shared sampling core.

What the family contributes is the prediction function: the running output tokens, followed
by the packed reference latents of every picture (RoPE frame index 1, 2, ... in the
transformer, as ``img_shapes`` lists them), conditioned on Qwen2.5-VL's encoding of the
instruction with the pictures. The core owns the loop, the sampler, Qwen's "true CFG" (norm
rescaled) and progress / interrupt. Schedule, noise, packing, prompt templates and reference
latents are those of diffusers' ``QwenImageEditPlusPipeline``, so with the "Qwen reference
pipeline" sizes the result equals it (tests/test_qwen_image_edit.py).

Qwen-Image-Edit-2511 runs the same edit; its transformer is loaded with ``zero_cond_t`` (see
:mod:`.loading`), and diffusers' transformer then modulates the tokens ``img_shapes`` lists after the
first entry (the reference pictures) with the embedding of timestep 0 and the output tokens with the
step's. That is why ``img_shapes`` must list the output first and every reference after it, per
row, exactly as the reference pipeline does; the comparison with QwenImageEditPlusPipeline on a
2511-configured transformer is tested the same way.

CFG's two branches run as one batched transformer call on accelerators (``cfg_batched`` None:
batched except on a CPU, where two calls measured ~10 % faster per step at 512², see
docs/qwen_image.md). Their prompts usually have different token lengths (the negative is often
" "), so the shorter one is zero-padded at the end and masked with ``encoder_hidden_states_mask``:
masked keys get no attention weight and text positions count from the start, so each row equals
its unbatched call (tested within 1e-5).

With a ``mask`` the decoded result is blended back into picture 1 at its own size, so every
pixel outside the mask is picture 1's pixel, bit for bit.

With ``init_latents`` (a LATENT from ComfyUI's VAE Encode, LoadLatent, an upscale or an earlier edit)
the edit works at that latent's size and, with ``denoise < 1``, starts from it instead of from
picture 1, as ComfyUI's KSampler does with its latent; picture 1 still conditions the edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import sampling as core
from ..core.errors import EditKitError
from ..core.images import repeat_batch
from ..core.lora import applies_loras
from ..core.runtime import Component, Runtime
from . import vae as vae_ops
from .latent import CHANNELS, PREVIEW, SPATIAL, pack, unpack
from .loading import EDIT, EDIT_2509
from .sizes import OutputSize, ReferenceSizes, resize_result, vae_copy, vl_copy

DEFAULT_OUTPUT = OutputSize()
DEFAULT_REFERENCES = ReferenceSizes()


@dataclass
class EditResult:
    images: torch.Tensor  # [B,3,H,W] 0..1, CPU (picture 1's size when a mask was given)
    latents: torch.Tensor  # [B,16,h,w] model space, CPU
    size: tuple[int, int]  # working (width, height)
    reference_sizes: list = field(default_factory=list)  # per picture ((vl_w, vl_h), (vae_w, vae_h))


def activation_bytes(rows: int, tokens: int, text_tokens: int, dtype: torch.dtype) -> int:
    """Working memory estimate of one transformer call (ComfyUI's Flux-style per-token budget)."""
    element = torch.tensor([], dtype=dtype).element_size()
    return int(rows * (tokens + text_tokens) * 4 * element * 0.01 * 3.1 * 1024 * 1024)


def _check_pictures(pictures: list[torch.Tensor]) -> None:
    if not pictures:
        raise EditKitError("No picture to edit: connect an IMAGE to 'image'.")
    for index, picture in enumerate(pictures):
        if picture.ndim != 4 or picture.shape[0] != 1 or picture.shape[1] != 3:
            raise EditKitError(f"Picture {index + 1} must be one RGB picture; got shape {tuple(picture.shape)}.")


def check_prompt(prompt: str) -> None:
    if not prompt or not prompt.strip():
        raise EditKitError("The prompt is empty. Describe the edit, e.g. 'change the blue tracksuit to red'.")


def _pad_texts(texts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack ``[1,T_i,D]`` states into ``[n,T,D]``, zero-padded at the end, with a mask when lengths differ."""
    longest = max(t.shape[1] for t in texts)
    if all(t.shape[1] == longest for t in texts):
        return torch.cat(texts), None
    padded = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[1])) for t in texts])
    mask = torch.zeros(len(texts), longest, dtype=torch.bool)
    for row, t in enumerate(texts):
        mask[row, : t.shape[1]] = True
    return padded, mask


@applies_loras
@torch.inference_mode()
def edit(
    transformer: Component,
    text_encoder,
    vae: Component,
    pictures: list[torch.Tensor],
    prompt: str,
    runtime: Runtime,
    *,
    scheduler_config: dict,
    negative_prompt: str = " ",
    true_cfg_scale: float = 4.0,
    steps: int = 28,
    seed: int = 0,
    denoise: float = 1.0,
    mask: torch.Tensor | None = None,
    sampler: core.SamplerSettings | None = None,
    batch_size: int = 1,
    output: OutputSize = DEFAULT_OUTPUT,
    references: ReferenceSizes = DEFAULT_REFERENCES,
    variant: str = EDIT_2509,
    cfg_batched: bool | None = None,
    init_latents: torch.Tensor | None = None,
    progress=None,
) -> EditResult:
    """Edit picture 1 (``pictures[0]``, ``[1,3,H,W]`` in 0..1) following ``prompt``; see the module docstring.

    ``transformer`` may carry LoRAs (:class:`..core.lora.LoraComponent`): they are applied for this run only.
    ``init_latents`` (model space ``[L,16,h,w]``) sets the working size (``output`` is then not used) and,
    with ``denoise < 1``, the start; each of its latents yields ``batch_size`` results.
    """
    _check_pictures(pictures)
    check_prompt(prompt)
    if not negative_prompt:
        negative_prompt = " "  # as the reference pipeline: CFG still runs, against a blank prompt
    if batch_size < 1:
        raise EditKitError(f"batch_size must be at least 1 (got {batch_size}).")
    use_cfg = float(true_cfg_scale) > 1.0

    image_h, image_w = pictures[0].shape[-2:]
    if init_latents is not None:
        init_latents = repeat_batch(init_latents, batch_size)
        batch_size = init_latents.shape[0]
        width, height = init_latents.shape[-1] * SPATIAL, init_latents.shape[-2] * SPATIAL
    else:
        width, height = output.resolve(image_w, image_h)
    plan = references.plan([(p.shape[-1], p.shape[-2]) for p in pictures], (width, height),
                           same_vl_as_vae=variant == EDIT)
    if mask is not None and tuple(mask.shape[-2:]) != (image_h, image_w):
        raise EditKitError(
            f"The mask is {mask.shape[-1]}x{mask.shape[-2]} but image 1 is {image_w}x{image_h}. Give a mask of "
            "image 1's size (e.g. the MASK of the same Load Image node, or BEN2's mask of image 1)."
        )

    # Prompt (cached per prompt + pictures + sizes inside the encoder).
    vl_pictures = [vl_copy(p, *vl) for p, (vl, _vae) in zip(pictures, plan)]
    cond = text_encoder.encode(prompt, vl_pictures, variant, runtime)
    uncond = text_encoder.encode(negative_prompt, vl_pictures, variant, runtime) if use_cfg else None
    model = transformer.module
    joint = int(model.config.joint_attention_dim)
    if cond.shape[-1] != joint:
        raise EditKitError(
            f"The text encoder gives {cond.shape[-1]}-wide states but this transformer reads {joint}: they belong to "
            "different models. Qwen-Image-Edit-2509 needs Qwen2.5-VL-7B (qwen_2.5_vl_7b*.safetensors)."
        )

    # Reference latents (and picture 1 at the output size, to start from when denoise < 1).
    ref_latents = [vae_ops.encode(vae, vae_copy(p, *vae_wh), runtime) for p, (_vl, vae_wh) in zip(pictures, plan)]
    lh, lw = height // SPATIAL, width // SPATIAL
    init = None
    if denoise < 1.0 and init_latents is not None:
        init = pack(init_latents.float())
    elif denoise < 1.0:
        first = ref_latents[0] if plan[0][1] == (width, height) else vae_ops.encode(
            vae, vae_copy(pictures[0], width, height), runtime)
        init = pack(first).repeat(batch_size, 1, 1)
    refs = torch.cat([pack(latent) for latent in ref_latents], dim=1)
    img_shapes = [(1, lh // 2, lw // 2)] + [(1, latent.shape[-2] // 2, latent.shape[-1] // 2) for latent in ref_latents]

    schedule = core.flow_schedule(scheduler_config, steps, image_seq_len=(lh // 2) * (lw // 2), denoise=denoise)
    if torch.isnan(schedule.sigmas).any():
        raise EditKitError(f"{steps} step(s) are too few for this schedule (its terminal stretch needs at least 2).")
    noise = core.seeded_noise((batch_size, CHANNELS, lh, lw), seed)
    tokens = noise.shape[-1] // 2 * noise.shape[-2] // 2

    dtype = transformer.dtype
    rows = batch_size * (2 if use_cfg and cfg_batched is not False else 1)
    device = runtime.acquire(transformer, memory_required=activation_bytes(
        rows, tokens + refs.shape[1], max(cond.shape[1], 0 if uncond is None else uncond.shape[1]), dtype))
    if cfg_batched is None:  # one call for both branches on accelerators; on a CPU two calls measured ~10 % faster
        cfg_batched = torch.device(device).type != "cpu"
    refs = refs.to(device=device, dtype=dtype)
    texts = {"cond": cond, "uncond": uncond}
    timesteps = schedule.timesteps.to(device=device, dtype=dtype)
    cache: dict[tuple, tuple] = {}

    def extras(branches: tuple) -> tuple:
        """Per-branch-combination inputs that stay the same over the steps, built once."""
        found = cache.get(branches)
        if found is None:
            states, text_mask = _pad_texts([texts[b] for b in branches])
            n = batch_size * len(branches)
            states = states.repeat_interleave(batch_size, 0).to(device=device, dtype=dtype)
            if text_mask is not None:
                text_mask = text_mask.repeat_interleave(batch_size, 0).to(device)
            found = cache[branches] = (states, text_mask, refs.repeat(n, 1, 1), n)
        return found

    def predict(x: torch.Tensor, i: int, branches: tuple) -> torch.Tensor:
        states, text_mask, r, n = extras(branches)
        velocity = model(
            hidden_states=torch.cat([x.to(dtype), r], dim=1),
            timestep=timesteps[i].expand(n),
            encoder_hidden_states=states,
            encoder_hidden_states_mask=text_mask,
            img_shapes=[img_shapes] * n,
            return_dict=False,
        )[0]
        return velocity[:, :tokens]

    result = core.sample(
        predict, pack(noise).to(device), schedule, runtime,
        init=None if init is None else init.to(device),
        sampler=sampler or core.SamplerSettings(seed=seed),
        guidance=core.Guidance(scale=float(true_cfg_scale), rescale="norm", batched=cfg_batched, enabled=use_cfg),
        noise_shape=(batch_size, CHANNELS, lh, lw), to_sampler_layout=pack,
        preview_of=lambda x0: unpack(x0, lh, lw), progress=progress, preview_format=PREVIEW,
    )
    latents = unpack(result, lh, lw)
    images = vae_ops.decode(vae, latents, runtime).float().cpu()
    if mask is not None:
        original = pictures[0].float().cpu()
        images = resize_result(images, image_w, image_h)
        weight = mask.float().cpu().clamp(0, 1)
        images = original + weight * (images - original)
    return EditResult(images=images, latents=latents.float().cpu(), size=(width, height), reference_sizes=plan)
