"""Widening FLUX.1-Fill's input projection from 384 to 192 features.

Fill reads (noisy 0:64, masked-image latent 64:128, folded pixel mask 128:384). Kontext-inpaint
reads (noisy 0:64, source latent 64:128, mask-image latent 128:192). The new projection keeps
Fill's columns for the first 128 features, so Fill's image-context columns now read the source
latent, starts the mask-image columns at zero (or small random values, ai-toolkit's choice, for
A/B runs) and drops Fill's 256 pixel-mask columns. With zeros, the widened model equals Fill
told "keep everything" (masked image = source, mask = 0): it reproduces the source until
training teaches it to edit.
"""

from __future__ import annotations

import torch

from ...core.errors import EditKitError
from ..fill import FILL_IN_FEATURES

KONTEXT_IN_FEATURES = 192
TOKEN_FEATURES = 64  # one packed 16-channel latent per token
INIT_CHOICES = ("zeros", "small_random")


def _dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The projection's weight as a dense float tensor (dequantizing GGUF weights; fp8 weights of a scaled fp8
    file times their layer's ``weight_scale``)."""
    weight = layer.weight
    if hasattr(weight, "quant_type"):
        from ...core.diffusers_compat import dequantize_gguf_tensor

        return dequantize_gguf_tensor(weight).float()
    return weight.detach().float() * float(getattr(layer, "weight_scale", 1.0))


@torch.no_grad()
def widen_fill_transformer(transformer, init: str = "zeros", std: float = 1e-3, seed: int = 0):
    """Give a FLUX.1-Fill transformer (diffusers ``FluxTransformer2DModel``, in_channels 384) the
    192-feature Kontext-inpaint input projection, in place, and return it.

    ``init="small_random"`` fills the new mask-image columns with N(0, ``std``) values drawn from
    ``seed`` instead of zeros. The config is updated (``in_channels=192``, ``out_channels=64``
    pinned) so ``save_pretrained``/``from_pretrained`` round-trip.
    """
    if init not in INIT_CHOICES:
        raise EditKitError(f"Unknown init '{init}'; use one of {INIT_CHOICES}.")
    old = transformer.x_embedder
    in_features = transformer.config.in_channels
    if in_features != FILL_IN_FEATURES:
        raise EditKitError(
            f"Widening needs FLUX.1-Fill (384 input features); this transformer has {in_features}. "
            "Load flux1-fill-dev (or a trained Kontext-inpaint model, which needs no widening)."
        )
    weight = _dense_weight(old)
    dtype = old.bias.dtype if old.bias is not None else torch.float32
    new = torch.nn.Linear(KONTEXT_IN_FEATURES, weight.shape[0], bias=old.bias is not None, device=weight.device,
                          dtype=dtype)
    new.weight.zero_()
    keep = 2 * TOKEN_FEATURES
    new.weight[:, :keep] = weight[:, :keep].to(dtype)
    if init == "small_random":
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((weight.shape[0], KONTEXT_IN_FEATURES - keep), generator=generator) * std
        new.weight[:, keep:] = noise.to(device=weight.device, dtype=dtype)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    transformer.x_embedder = new
    out_channels = transformer.config.out_channels or TOKEN_FEATURES
    transformer.register_to_config(in_channels=KONTEXT_IN_FEATURES, out_channels=out_channels)
    return transformer


def ensure_kontext(transformer, name: str, init: str = "zeros", seed: int = 0):
    """Make ``transformer`` a Kontext-inpaint model: widen FLUX.1-Fill, keep a 192-feature model.

    Anything else is refused with an error that names the model and what it would need.
    """
    features = transformer.config.in_channels
    if features == FILL_IN_FEATURES:
        return widen_fill_transformer(transformer, init=init, seed=seed)
    if features != KONTEXT_IN_FEATURES:
        raise EditKitError(
            f"'{name}' has {features} input features. Kontext-inpaint needs a trained Kontext-inpaint transformer "
            f"({KONTEXT_IN_FEATURES}) or FLUX.1-Fill-dev ({FILL_IN_FEATURES}, widened first)."
        )
    return transformer
