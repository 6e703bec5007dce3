"""BEN2 Base: the tiny configuration of the same network, in both published formats (flat safetensors, .pth)."""

from __future__ import annotations

from .core import Family, File, Part, pack_module


def _ben2():
    return pack_module("pipelines.ben2")


def _save(sd, path, _scales):
    _ben2().save_ben2_checkpoint(sd, path)


FAMILY = Family(
    "ben2", None,
    parts={"network": Part(lambda _: _ben2().BEN2Base(_ben2().BEN2Config.tiny()), seed=20261125, precision=None)},
    files={f"ben2_{suffix}": File(f"background_removal/BEN2_Base.{suffix}", "network", write=_save)
           for suffix in ("safetensors", "pth")},
)
