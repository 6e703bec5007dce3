"""Write tiny random-weight models, in the real file formats, as a ComfyUI-style models tree.

    python tests/make_tiny_models.py OUT_DIR

OUT_DIR then looks like ComfyUI's ``models/`` folder, with the file names the bundled workflows use, so the
workflows run unchanged on it (the pictures are noise: random weights). The families are declared in
``tests/tiny/``; this module is the command line, and keeps the names ``scripts/bench`` and the streaming and
freeing tests import from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import make_tree as make_tiny_models  # noqa: E402
from tiny.core import main as _main  # noqa: E402
from tiny.core import randomize_ as _randomize_  # noqa: E402,F401
from tiny.core import save as _save  # noqa: E402,F401
from tiny.core import write_gguf  # noqa: E402,F401
from tiny.flux1 import TINY_TRANSFORMER, TINY_VAE  # noqa: E402,F401


def main(argv=None) -> int:
    return _main(make_tiny_models, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
