"""Old name of ``tiny.flux2``, kept for ``scripts/benchmark_flux2.py`` (import ``tiny`` instead)."""

from tiny.flux2 import FAMILY


def tiny_vae():
    return FAMILY.build("vae")
