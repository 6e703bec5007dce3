"""Write tiny random-weight models, in the real file formats, as a ComfyUI-style models tree.

    python tests/make_tiny_models.py OUT_DIR

OUT_DIR then looks like ComfyUI's ``models/`` folder, with the file names the bundled workflows use, so the
workflows run unchanged on it (the pictures are noise: random weights). The families are declared in
``tests/tiny/``; this module is only its command line (code imports ``tiny``, ``tiny.core`` and the family
modules ``tiny.<family>`` directly).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import make_tree  # noqa: E402
from tiny.core import main as _main  # noqa: E402


def main(argv=None) -> int:
    return _main(make_tree, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
