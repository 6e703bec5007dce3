"""Draw the example input pictures in workflows/inputs/ (self-made, deterministic).

    python scripts/make_example_inputs.py [OUT_DIR]

The bundled workflows load these by name; users replace them with their own pictures. They
are simple drawings, enough to show what each workflow does with real weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]


def _vertical_gradient(width: int, height: int, top, bottom) -> Image.Image:
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    colors = (1 - t) * np.array(top, dtype=np.float64) + t * np.array(bottom, dtype=np.float64)
    return Image.fromarray(np.repeat(colors, width, axis=1).astype(np.uint8), "RGB")


def table_scene() -> Image.Image:
    """A bowl on a wooden table; the bowl's area is transparent (ComfyUI reads it as the MASK)."""
    size = 768
    image = _vertical_gradient(size, size, (214, 200, 176), (168, 150, 126))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 470, size, size], fill=(121, 78, 45))
    for y in range(480, size, 22):
        draw.line([0, y, size, y + 6], fill=(104, 66, 37), width=3)
    draw.rectangle([560, 120, 700, 300], fill=(90, 120, 150), outline=(60, 60, 60), width=6)  # a picture frame
    draw.ellipse([250, 400, 520, 520], fill=(230, 230, 225), outline=(180, 180, 175), width=4)  # bowl
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    alpha = Image.new("L", (size, size), 255)
    ImageDraw.Draw(alpha).ellipse([220, 300, 550, 540], fill=0)  # transparent = inpaint here
    image.putalpha(alpha.filter(ImageFilter.GaussianBlur(6)))
    return image


def landscape() -> Image.Image:
    """Hills under a sky, portrait format, to be extended sideways."""
    width, height = 512, 768
    image = _vertical_gradient(width, height, (120, 170, 230), (230, 220, 200))
    draw = ImageDraw.Draw(image)
    xs = np.arange(width)
    for base, amp, freq, color in ((470, 40, 0.012, (96, 130, 90)), (540, 30, 0.02, (70, 110, 60)),
                                   (620, 25, 0.03, (50, 85, 45))):
        ys = base + amp * np.sin(xs * freq)
        draw.polygon([(0, height), *zip(xs.tolist(), ys.tolist()), (width, height)], fill=color)
    draw.ellipse([340, 110, 420, 190], fill=(255, 240, 200))
    return image.filter(ImageFilter.GaussianBlur(1.0))


def portrait() -> Image.Image:
    """A stylised person in front of a room, for background removal and portrait edits."""
    size = 768
    image = _vertical_gradient(size, size, (160, 175, 190), (110, 120, 135))
    draw = ImageDraw.Draw(image)
    draw.rectangle([40, 80, 260, 420], fill=(200, 190, 150))  # window
    draw.rectangle([520, 300, 740, 768], fill=(90, 70, 60))  # shelf
    draw.ellipse([214, 520, 554, 900], fill=(60, 80, 140))  # shoulders
    draw.rectangle([344, 430, 424, 560], fill=(224, 180, 150))  # neck
    draw.ellipse([274, 190, 494, 470], fill=(232, 190, 160))  # face
    draw.pieslice([264, 160, 504, 400], 180, 360, fill=(70, 45, 30))  # hair
    for x in (340, 428):
        draw.ellipse([x - 12, 300, x + 12, 318], fill=(50, 40, 35))  # eyes
    draw.arc([334, 350, 434, 410], 20, 160, fill=(150, 70, 70), width=6)  # mouth
    return image.filter(ImageFilter.GaussianBlur(1.5))


PICTURES = {
    "editkit_table.png": table_scene,
    "editkit_landscape.png": landscape,
    "editkit_portrait.png": portrait,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=str(ROOT / "workflows" / "inputs"))
    out = Path(parser.parse_args(argv).out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in PICTURES.items():
        draw().save(out / name, optimize=True)
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
