"""FLUX.2 [klein] on the shared sampling core: text-to-image and editing with any number of reference pictures.

What the family adds to the core:

* the schedule: ``linspace(1, 1/N, N)`` shifted with klein's *empirical* ``mu``, which depends on the token
  count and on the number of steps (diffusers' ``compute_empirical_mu``, passed to the core as a function of
  the full schedule's length so the ``denoise`` convention gets the mu of the schedule it cuts from);
* the model call: the running latent's tokens followed by every reference picture's tokens in one sequence,
  position ids ``(0, row, col, 0)`` for the picture being made and ``(10 k, row, col, 0)`` for reference ``k``
  (1-based), text ids ``(0, 0, 0, i)``, timestep ``t / 1000``, no guidance embedding; only the first
  ``N`` output tokens (the picture's) are the velocity;
* CFG as ``Flux2KleinPipeline`` does it (``neg + g (pos - neg)``, only for the non-distilled ``base`` models);
  both halves run as one batched call.

Reference pictures are encoded once, before the loop, at their own sizes (each may differ from the output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import sampling as core
from ..core.errors import EditKitError
from ..core.lora import applies_loras
from ..core.runtime import Component, Runtime
from . import latent as fl
from .vae import encode_raw


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """klein's shift, diffusers' ``compute_empirical_mu`` (used as is so the numbers are the reference's)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=int(image_seq_len), num_steps=int(num_steps))


def flux2_schedule(scheduler_config: dict, steps: int, tokens: int, *, denoise: float = 1.0,
                   convention: str = "denoise") -> core.Schedule:
    """klein's schedule for ``steps`` model calls over ``tokens`` image tokens."""
    return core.flow_schedule(scheduler_config, steps, denoise=denoise, convention=convention,
                              mu=lambda total: empirical_mu(tokens, total))


def check_size(width: int, height: int, what: str = "Size") -> None:
    """Sides must be multiples of 16 (8 pixels per latent pixel, 2x2 latent pixels per token)."""
    m = fl.SIZE_MULTIPLE
    if width % m or height % m or width < m or height < m:
        near = lambda v: max(m, int(v / m + 0.5) * m)  # noqa: E731
        raise EditKitError(f"{what} {width}x{height} is not a multiple of {m} on both sides, which FLUX.2 needs. "
                           f"The nearest valid size is {near(width)}x{near(height)}.")


@dataclass
class References:
    """Reference pictures as transformer input: tokens ``[1 or B, N_ref, 128]`` and ids ``[N_ref, 4]``."""

    tokens: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return 0 if self.tokens is None else int(self.tokens.shape[1])


def model_space(vae: Component, pixels: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Pixels ``[B, 3, H, W]`` (0..1) → model-space latents ``[B, 128, H/16, W/16]``."""
    return fl.raw_to_model(vae, encode_raw(vae, pixels, runtime))


def encode_references(vae: Component, pictures: list[torch.Tensor], runtime: Runtime, first_t: int = 1,
                      latents: list[torch.Tensor] | None = None) -> References:
    """Each picture ``[1 or B, 3, H, W]`` (own size) → tokens, with time ids ``10 * (first_t + k)``.

    ``latents`` are pictures already in model space (``[1 or B, 128, h, w]``), appended after ``pictures``.
    A batch of B pictures gives each sample its own reference (inpainting's source picture).
    """
    items = [model_space(vae, p, runtime) for p in pictures] + list(latents or [])
    if not items:
        return References()
    batch = max(item.shape[0] for item in items)
    tokens, ids = [], []
    for k, item in enumerate(items):
        if item.shape[0] not in (1, batch):
            raise EditKitError(f"Reference {k + 1} holds {item.shape[0]} pictures; give one, or one per output "
                               f"({batch}).")
        tokens.append(fl.pack(item).expand(batch, -1, -1))
        ids.append(fl.positions(fl.REFERENCE_T_STEP * (first_t + k), item.shape[-2], item.shape[-1]))
    return References(torch.cat(tokens, dim=1), torch.cat(ids, dim=0))


def activation_bytes(batch: int, tokens: int, width: int, dtype: torch.dtype) -> int:
    """Rough working memory of one forward (widest activations: the single blocks' fused qkv + 3x MLP), with headroom."""
    element = torch.tensor([], dtype=dtype).element_size()
    return int(batch * (tokens + 512) * width * element * 14)


def predictor(transformer: Component, device: torch.device, timesteps: torch.Tensor, texts: dict[str, torch.Tensor],
              image_ids: torch.Tensor, references: References) -> core.Predict:
    """The velocity function the core calls: ``predict(x [B, N, 128], step, branches)``.

    ``texts`` maps ``"cond"`` (and ``"uncond"``) to ``[1, T, D]`` states on ``device`` in the model dtype.
    """
    model = transformer.module
    dtype = transformer.dtype
    t_model = timesteps.to(device=device, dtype=torch.float32)
    ref_tokens = None if references.tokens is None else references.tokens.to(device=device, dtype=dtype)
    ids = image_ids if references.ids is None else torch.cat([image_ids, references.ids], dim=0)
    ids = ids.to(device)
    text_ids = {b: fl.text_positions(s.shape[1]).to(device) for b, s in texts.items()}
    cache: dict[tuple, tuple] = {}

    def inputs(branches: tuple, batch: int):
        key = (branches, batch)
        if key not in cache:
            per = batch // len(branches)
            states = torch.cat([texts[b].expand(per, -1, -1) for b in branches])
            txt = torch.cat([text_ids[b].unsqueeze(0).expand(per, -1, -1) for b in branches])
            refs = None
            if ref_tokens is not None:
                refs = torch.cat([ref_tokens.expand(per, -1, -1)] * len(branches))
            cache[key] = (states, txt, ids.unsqueeze(0).expand(batch, -1, -1), refs)
        return cache[key]

    def predict(x: torch.Tensor, i: int, branches: tuple) -> torch.Tensor:
        states, txt, img_ids, refs = inputs(branches, x.shape[0])
        n = x.shape[1]
        hidden = x.to(dtype) if refs is None else torch.cat([x.to(dtype), refs], dim=1)
        out = model(hidden_states=hidden, encoder_hidden_states=states, timestep=t_model[i].expand(x.shape[0]),
                    img_ids=img_ids, txt_ids=txt, guidance=None, return_dict=False)[0]
        return out[:, :n].float()

    return predict


@applies_loras
@torch.inference_mode()
def sample(
    transformer: Component,
    text: torch.Tensor,
    noise: torch.Tensor,
    schedule: core.Schedule,
    runtime: Runtime,
    *,
    references: References | None = None,
    init: torch.Tensor | None = None,
    negative: torch.Tensor | None = None,
    cfg: float = 1.0,
    sampler: core.SamplerSettings | None = None,
    after_step: core.AfterStep | None = None,
    progress=None,
) -> torch.Tensor:
    """Denoise ``noise`` (model space ``[B, 128, h, w]``; from ``init``, model space, when partially denoising).

    ``text`` / ``negative`` are ``[1, T, D]`` states. Returns the clean model-space latent ``[B, 128, h, w]``
    (float32, on the compute device). ``after_step`` works on the packed tokens ``[B, h*w, 128]``.
    """
    references = references or References()
    batch, _, h, w = noise.shape
    use_cfg = negative is not None and cfg != 1.0
    calls = 2 if use_cfg else 1
    width = int(transformer.module.config.num_attention_heads * transformer.module.config.attention_head_dim)
    tokens = h * w + references.count
    device = runtime.acquire(transformer, memory_required=activation_bytes(batch * calls, tokens, width,
                                                                           transformer.dtype))
    dtype = transformer.dtype
    texts = {"cond": text.to(device=device, dtype=dtype)}
    if use_cfg:
        texts["uncond"] = negative.to(device=device, dtype=dtype)
    predict = predictor(transformer, device, schedule.timesteps, texts, fl.positions(0, h, w), references)
    x = fl.pack(noise.to(device=device, dtype=torch.float32))
    start = None if init is None else fl.pack(init.to(device=device, dtype=torch.float32))
    out = core.sample(
        predict, x, schedule, runtime, init=start, sampler=sampler or core.SamplerSettings(),
        guidance=core.Guidance(scale=cfg, enabled=use_cfg, batched=True),
        noise_shape=tuple(noise.shape), to_sampler_layout=fl.pack, progress=progress, preview_format=fl.PREVIEW,
        preview_of=lambda x0: fl.unpack(x0, h, w), after_step=after_step,
    )
    return fl.unpack(out, h, w)


def generate(
    model,
    vae: Component,
    text: torch.Tensor,
    runtime: Runtime,
    *,
    width: int,
    height: int,
    seed: int = 0,
    steps: int = 4,
    batch_size: int = 1,
    references: list[torch.Tensor] | None = None,
    negative: torch.Tensor | None = None,
    cfg: float = 1.0,
    init_raw: torch.Tensor | None = None,
    denoise: float = 1.0,
    convention: str = "denoise",
    sampler: str = "euler",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text-to-image or edit with reference pictures; returns the raw latent ``[B, 32, H/8, W/8]`` (float32, CPU).

    ``model`` is a :class:`.loading.Flux2Model` (or a LoRA node's copy); ``references`` are pictures
    ``[1, 3, H_k, W_k]`` in 0..1, multiples of 16 (sized by the caller). ``init_raw`` (a raw LATENT) is the
    starting point for ``denoise`` < 1. ``noise`` (model space ``[B, 128, H/16, W/16]``) replaces the seeded draw.
    """
    check_size(width, height)
    h, w = height // fl.SIZE_MULTIPLE, width // fl.SIZE_MULTIPLE
    for k, picture in enumerate(references or []):
        check_size(picture.shape[-1], picture.shape[-2], f"Reference picture {k + 1}")
    if noise is None:
        noise = core.seeded_noise((batch_size, fl.MODEL_CHANNELS, h, w), seed)
    init = None
    if init_raw is not None:
        init = fl.raw_to_model(vae, fl.read_latent(init_raw, "starting latent"))
        if tuple(init.shape[-2:]) != (h, w):
            raise EditKitError(f"The starting latent is for a {init.shape[-1] * 16}x{init.shape[-2] * 16} picture, "
                               f"not {width}x{height}; set width and height to its size.")
        if init.shape[0] not in (1, noise.shape[0]):
            raise EditKitError(f"The starting latent holds {init.shape[0]} pictures but batch_size is "
                               f"{noise.shape[0]}; use one latent or as many as the batch.")
    elif denoise < 1.0:
        raise EditKitError("denoise below 1 needs a starting latent or image; connect one, or set denoise to 1.")
    refs = encode_references(vae, list(references or []), runtime)
    schedule = flux2_schedule(model.scheduler_config, steps, h * w, denoise=denoise, convention=convention)
    transformer = model.transformer.get()
    out = sample(transformer, text, noise, schedule, runtime, references=refs, init=init, negative=negative,
                 cfg=cfg, sampler=core.SamplerSettings(name=sampler, seed=seed))
    return fl.model_to_raw(vae, out).cpu()


MAX_REFERENCE_PIXELS = 1024 * 1024  # Flux2KleinPipeline's limit for each reference picture


def fit_reference(picture: torch.Tensor, max_pixels: int = MAX_REFERENCE_PIXELS) -> torch.Tensor:
    """A picture ``[1, 3, H, W]`` (0..1) made fit for the model: at most ``max_pixels`` and sides multiples of 16.

    As ``Flux2KleinPipeline``: larger pictures are scaled down to that area (keeping the aspect ratio; bicubic
    with antialiasing here, Lanczos there). Sides are then cut down to multiples of 16 by a centred crop
    (diffusers stretches by a few pixels before cropping; a crop keeps the pixels where they were).
    """
    import math

    import torch.nn.functional as F

    _, _, h, w = picture.shape
    if h * w > max_pixels:
        scale = math.sqrt(max_pixels / (h * w))
        h, w = int(h * scale), int(w * scale)
        picture = F.interpolate(picture, size=(h, w), mode="bicubic", antialias=True).clamp(0.0, 1.0)
    m = fl.SIZE_MULTIPLE
    ch, cw = h // m * m, w // m * m
    if ch < m or cw < m:
        raise EditKitError(f"A reference picture of {w}x{h} pixels is too small: FLUX.2 needs at least {m}x{m}.")
    top, left = (h - ch) // 2, (w - cw) // 2
    return picture[:, :, top:top + ch, left:left + cw]
