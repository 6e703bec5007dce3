"""Old name of ``tiny.flux2``, kept while ``scripts/benchmark_flux2.py`` imports it (use ``tiny``)."""

from tiny.flux2 import *  # noqa: F403
from tiny.flux2 import FAMILY

make_flux2_models = FAMILY.write


def tiny_vae():
    return FAMILY.build("vae")
