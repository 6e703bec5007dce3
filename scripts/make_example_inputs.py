"""Draw the example input pictures in workflows/inputs/ (self-made, deterministic).

    python scripts/make_example_inputs.py [OUT_DIR]

The bundled workflows load these by name; users replace them with their own pictures. They
are simple drawings, enough to show what each workflow does with real weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

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
    _portrait_person(draw)
    return image.filter(ImageFilter.GaussianBlur(1.5))


def _portrait_person(draw: ImageDraw.ImageDraw) -> None:
    """The person of :func:`portrait` (also drawn alone by scripts/make_thumbnails.py for its cut-out)."""
    draw.ellipse([214, 520, 554, 900], fill=(60, 80, 140))  # shoulders
    draw.rectangle([344, 430, 424, 560], fill=(224, 180, 150))  # neck
    draw.ellipse([274, 190, 494, 470], fill=(232, 190, 160))  # face
    draw.pieslice([264, 160, 504, 400], 180, 360, fill=(70, 45, 30))  # hair
    for x in (340, 428):
        draw.ellipse([x - 12, 300, x + 12, 318], fill=(50, 40, 35))  # eyes
    draw.arc([334, 350, 434, 410], 20, 160, fill=(150, 70, 70), width=6)  # mouth


def _figure(draw: ImageDraw.ImageDraw, cx: int, top: int, suit, stripe=None) -> None:
    """A standing person (head, torso, arms, legs) in a two-piece outfit, facing the viewer."""
    skin, hair = (226, 186, 156), (62, 42, 30)
    draw.rounded_rectangle([cx - 120, top + 170, cx + 120, top + 470], 40, fill=suit)  # torso
    for side in (-1, 1):
        x = cx + side * 150
        draw.rounded_rectangle([min(x, x - side * 60) - 10, top + 180, max(x, x - side * 60) + 10, top + 450], 26,
                               fill=suit)  # arm
        draw.ellipse([x - 32, top + 440, x + 22, top + 494], fill=skin)  # hand
        draw.rounded_rectangle([cx + side * 15 - (100 if side < 0 else 0), top + 460,
                                cx + side * 15 + (0 if side < 0 else 100), top + 740], 30, fill=suit)  # leg
        if stripe is not None:
            sx = cx + side * 120
            draw.line([sx, top + 190, sx, top + 460], fill=stripe, width=8)
            draw.line([cx + side * 105, top + 480, cx + side * 105, top + 730], fill=stripe, width=8)
    draw.rectangle([cx - 30, top + 130, cx + 30, top + 185], fill=skin)  # neck
    draw.ellipse([cx - 75, top, cx + 75, top + 165], fill=skin)  # face
    draw.pieslice([cx - 82, top - 12, cx + 82, top + 120], 180, 360, fill=hair)
    for x in (cx - 30, cx + 30):
        draw.ellipse([x - 8, top + 70, x + 8, top + 82], fill=(45, 35, 30))
    draw.arc([cx - 30, top + 95, cx + 30, top + 130], 20, 160, fill=(150, 70, 70), width=4)


def tracksuit() -> Image.Image:
    """A person in a blue tracksuit with white stripes in a plain studio (portrait format, 640x768)."""
    width, height = 640, 768
    image = _vertical_gradient(width, height, (236, 232, 226), (196, 190, 182))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 690, width, height], fill=(150, 140, 128))  # floor
    _figure(draw, width // 2, 20, suit=(40, 80, 170), stripe=(245, 245, 245))
    return image.filter(ImageFilter.GaussianBlur(1.0))


def tshirt_text() -> Image.Image:
    """A grey T-shirt with the word GYM printed on it, large and legible (for text edits)."""
    size = 768
    image = _vertical_gradient(size, size, (214, 222, 230), (180, 190, 200))
    draw = ImageDraw.Draw(image)
    shirt = (120, 124, 130)
    draw.polygon([(214, 150), (300, 110), (468, 110), (554, 150), (690, 290), (600, 370), (560, 330), (560, 720),
                  (208, 720), (208, 330), (168, 370), (78, 290)], fill=shirt)  # T-shirt
    draw.ellipse([324, 86, 444, 160], fill=(214, 222, 230))  # neckline
    font = ImageFont.load_default(size=170)
    box = draw.textbbox((0, 0), "GYM", font=font)
    x = (size - (box[2] - box[0])) // 2 - box[0]
    draw.text((x, 330 - box[1]), "GYM", font=font, fill=(250, 250, 250))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def jacket() -> Image.Image:
    """A red leather-look jacket on a white background (a garment reference, 512x384)."""
    image = Image.new("RGB", (512, 384), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    red, dark = (170, 30, 36), (110, 18, 24)
    draw.polygon([(170, 50), (220, 30), (292, 30), (342, 50), (420, 140), (380, 180), (352, 155), (352, 360),
                  (160, 360), (160, 155), (132, 180), (92, 140)], fill=red)
    draw.polygon([(220, 30), (256, 100), (292, 30)], fill=(250, 250, 250))  # collar opening
    draw.line([256, 100, 256, 360], fill=dark, width=6)  # zip
    for y in (200, 270):
        draw.rectangle([185, y, 235, y + 10], fill=dark)  # pockets
        draw.rectangle([277, y, 327, y + 10], fill=dark)
    return image.filter(ImageFilter.GaussianBlur(0.8))


def beach() -> Image.Image:
    """A beach under a blue sky (a background reference, 768x384)."""
    width, height = 768, 384
    image = _vertical_gradient(width, height, (90, 150, 225), (190, 220, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 180, width, 250], fill=(40, 110, 170))  # sea
    draw.polygon([(0, 245), (width, 225), (width, height), (0, height)], fill=(230, 210, 160))  # sand
    draw.ellipse([600, 40, 670, 110], fill=(255, 245, 200))  # sun
    draw.line([120, 330, 150, 160], fill=(110, 80, 50), width=12)  # palm trunk
    for dx, dy in ((-90, -10), (90, -20), (-60, 40), (70, 40)):
        draw.line([150, 160, 150 + dx, 160 + dy], fill=(40, 120, 50), width=14)
    return image.filter(ImageFilter.GaussianBlur(1.0))


PICTURES = {
    "editkit_table.png": table_scene,
    "editkit_landscape.png": landscape,
    "editkit_portrait.png": portrait,
    "editkit_tracksuit.png": tracksuit,
    "editkit_tshirt_text.png": tshirt_text,
    "editkit_jacket.png": jacket,
    "editkit_beach.png": beach,
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
