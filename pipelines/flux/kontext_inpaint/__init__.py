"""Kontext-inpaint: FLUX.1-Fill widened to a 32-channel conditioning (source + mask-image latents).

See ``shared/design/KONTEXT_INPAINT.md`` for the contract. Public API:

* :func:`widen_fill_transformer` — turn a loaded FLUX.1-Fill transformer into the 192-feature model;
* :func:`edit` / :func:`multi_round` — sample single and chained edits in latent space;
* :mod:`.train` (with :mod:`.config`, :mod:`.dataset`, :mod:`.checkpoint`) — the two-stage fine-tune;
  its CLI is ``scripts/train_kontext_inpaint.py``.
"""

from .conditioning import condition_tokens, mask_image_latent, mask_to_image
from .sampler import EditResult, edit, multi_round, round_seed
from .widen import KONTEXT_IN_FEATURES, ensure_kontext, widen_fill_transformer

__all__ = [
    "KONTEXT_IN_FEATURES",
    "EditResult",
    "condition_tokens",
    "edit",
    "ensure_kontext",
    "mask_image_latent",
    "mask_to_image",
    "multi_round",
    "round_seed",
    "widen_fill_transformer",
]
