"""EditKit's benchmarks on one harness (see harness.py): ``python -m scripts.bench [family[:part,...] ...|all]``."""
