"""Draw the template-browser thumbnails (``workflows/<name>.jpg``) from the example pictures and the API files.

    python scripts/make_thumbnails.py                 # every workflow
    python scripts/make_thumbnails.py flux_fill_inpaint zimage_progressive
    python scripts/make_thumbnails.py --check         # write nothing; fail when a thumbnail is out of date

Why drawn, not screenshotted: a screenshot of the graph is unreadable at card size (256 px in the frontend's
template browser) and every EditKit graph looks alike there. A thumbnail shows the job instead: the
workflow's own example picture (``workflows/inputs/``) and what the workflow does to it (the masked area, the
extended canvas, the cut-out, the reference pictures side by side, the stages of the progressive recipe), with
its prompt or instruction quoted from the API file. The "result" side is an illustration derived from the
inputs (the cut-out from the drawing's own silhouette, a cross-fade for a blend, empty frames for pictures to
come), never a claimed model output: no weights are available where this runs.

What each workflow's card shows is one row of ``workflows/notes/thumbnails.json`` (layout, title, caption,
which input holds the quoted text), so a new workflow adds a row. ``tests/test_workflow_formats.py`` redraws
every thumbnail and fails when the committed JPEG differs from what this script draws now (e.g. after a
prompt changed), or when a workflow has no row. Needs Pillow, NumPy and PyYAML (all in the pack's
requirements).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_example_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
API_DIR = WORKFLOWS / "api"
INPUTS = WORKFLOWS / "inputs"
TABLE = WORKFLOWS / "notes" / "thumbnails.json"

SIZE = 512  # shown at 256 px on the card (object-contain in a 256 px square): drawn at 2x for sharp screens
QUALITY = 88
BACKGROUND = (32, 34, 40)
PANEL = (48, 51, 60)
TEXT = (240, 240, 240)
MUTED = (170, 176, 188)
ACCENT = (255, 160, 40)
MASK_TINT = (255, 40, 160)
TITLE_SIZE, QUOTE_SIZE, CAPTION_SIZE, LABEL_SIZE = 46, 25, 23, 22
VISUAL = (20, 86, SIZE - 20, 392)  # x0, y0, x1, y1 of the picture area


class ThumbnailError(RuntimeError):
    """A workflow the table does not describe, or a row the script cannot draw."""


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


# --------------------------------------------------------------------------------------------------------------
# Reading the workflow


def load_table(path: Path = TABLE) -> dict[str, dict]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["thumbnails"]


def _id_order(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def pictures(api: dict, row: dict) -> list[tuple[str, str]]:
    """(file name, node title) of each example picture the workflow loads, in node-id order."""
    found = [(node["inputs"]["image"], node.get("_meta", {}).get("title", ""))
             for _i, node in sorted(api.items(), key=lambda kv: _id_order(kv[0]))
             if node["class_type"] == "LoadImage" and isinstance(node["inputs"].get("image"), str)]
    return found or [(name, "") for name in row.get("pictures", [])]


def quoted(api: dict, row: dict) -> str | None:
    """The text the row quotes (``node_id.input``)."""
    if "text" not in row:
        return None
    node_id, name = row["text"].split(".", 1)
    value = api[node_id]["inputs"][name]
    if not isinstance(value, str):
        raise ThumbnailError(f"{row['text']} is not a text input")
    return value


def stages(api: dict) -> list[dict]:
    """The progressive recipe's stages: (width, height, steps, denoise) from the one-node recipe's YAML, or from
    the chain of samplers and latent resizes."""
    for node in api.values():
        if node["class_type"] == "EditKitZImageProgressive":
            recipe = yaml.safe_load(node["inputs"]["stages"])["progressive_stages"]
            out, size = [], None
            for stage in recipe.values():
                if "scale_by" in stage:
                    size = (round(size[0] * stage["scale_by"]), round(size[1] * stage["scale_by"]))
                else:
                    size = (stage["width"], stage["height"])
                out.append({"size": size, "steps": stage.get("num_inference_steps", 9),
                            "denoise": stage.get("strength")})
            return out
    out, size = [], None
    for _i, node in sorted(api.items(), key=lambda kv: _id_order(kv[0])):
        inputs = node["inputs"]
        if node["class_type"] == "LatentUpscale":
            size = (inputs["width"], inputs["height"])
        elif node["class_type"] == "LatentUpscaleBy":
            size = (round(size[0] * inputs["scale_by"]), round(size[1] * inputs["scale_by"]))
        elif node["class_type"] == "EditKitZImageSampler":
            first = not out
            size = (inputs["width"], inputs["height"]) if first else size
            out.append({"size": size, "steps": inputs["steps"], "denoise": None if first else inputs["denoise"]})
    if not out:
        raise ThumbnailError("no progressive stages in this workflow")
    return out


# --------------------------------------------------------------------------------------------------------------
# Drawing helpers


def picture(name: str) -> Image.Image:
    with Image.open(INPUTS / name) as image:
        return image.convert("RGBA")


def subject_mask(name: str) -> Image.Image:
    """The person in an example picture, as an 8-bit mask: the drawing's own shapes, drawn alone."""
    if name == "editkit_portrait.png":
        canvas = Image.new("RGB", (768, 768))
        make_example_inputs._portrait_person(ImageDraw.Draw(canvas))
        blur = 1.5
    elif name == "editkit_tracksuit.png":
        canvas = Image.new("RGB", (640, 768))
        make_example_inputs._figure(ImageDraw.Draw(canvas), 320, 20, suit=(255, 255, 255))
        blur = 1.0
    else:
        raise ThumbnailError(f"no subject silhouette for {name}")
    mask = Image.fromarray(((np.asarray(canvas).max(axis=2) > 0) * 255).astype(np.uint8), "L")
    return mask.filter(ImageFilter.GaussianBlur(blur))


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = min(width / image.width, height / image.height)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.LANCZOS)


def checker(width: int, height: int, cell: int = 10) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    light = ((x // cell + y // cell) % 2 == 0)
    array = np.where(light[..., None], 205, 150).astype(np.uint8).repeat(3, axis=2)
    return Image.fromarray(array, "RGB").convert("RGBA")


def tinted(image: Image.Image, mask: Image.Image, color=MASK_TINT, strength: float = 0.55) -> Image.Image:
    """``image`` with ``color`` laid over where ``mask`` is white (a mask overlay as ComfyUI's editor shows)."""
    base = image.convert("RGBA")
    layer = Image.new("RGBA", base.size, (*color, 255))
    alpha = mask.resize(base.size).point(lambda v: round(v * strength))
    return Image.composite(layer, base, alpha)


def paste(canvas: Image.Image, image: Image.Image, center: tuple[float, float]) -> tuple[int, int, int, int]:
    """Paste with a thin light frame; return the box."""
    x0, y0 = round(center[0] - image.width / 2), round(center[1] - image.height / 2)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([x0 - 2, y0 - 2, x0 + image.width + 1, y0 + image.height + 1], outline=(225, 225, 225), width=2)
    canvas.alpha_composite(image.convert("RGBA"), (x0, y0))
    return x0, y0, x0 + image.width, y0 + image.height


def arrow(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, color=ACCENT) -> None:
    """A horizontal arrow from x0 to x1 (either direction)."""
    sign = 1 if x1 >= x0 else -1
    draw.line([x0, y, x1 - sign * 12, y], fill=color, width=7)
    draw.polygon([(x1, y), (x1 - sign * 20, y - 15), (x1 - sign * 20, y + 15)], fill=color)


def badge(draw: ImageDraw.ImageDraw, text: str, center: tuple[float, float], size: int = LABEL_SIZE,
          fill=ACCENT, color=(20, 20, 20)) -> None:
    """A label on a rounded pill, readable over any picture."""
    face = font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    w, h = right - left + 16, bottom - top + 10
    x0, y0 = center[0] - w / 2, center[1] - h / 2
    draw.rounded_rectangle([x0, y0, x0 + w, y0 + h], radius=h / 2, fill=fill)
    draw.text((x0 + 8 - left, y0 + 5 - top), text, font=face, fill=color)


def wrap(text: str, face: ImageFont.FreeTypeFont, width: int, lines: int) -> list[str]:
    """Greedy word wrap into at most ``lines`` lines, the last one ending in an ellipsis if text is left."""
    words, out, line = text.split(), [], ""
    for index, word in enumerate(words):
        candidate = f"{line} {word}".strip()
        if face.getlength(candidate) <= width:
            line = candidate
            continue
        out.append(line)
        line = word
        if len(out) == lines:
            line = ""
            words = words[index:]
            break
    else:
        words = []
    if line:
        out.append(line)
    if words or len(out) > lines:
        out = out[:lines]
        last = out[-1]
        while last and face.getlength(last + " …") > width:
            last = last.rsplit(" ", 1)[0] if " " in last else last[:-1]
        out[-1] = last + " …"
    return out


def text_block(draw: ImageDraw.ImageDraw, lines: list[str], x: float, y: float, size: int, fill,
               center: bool = True, spacing: float = 1.22) -> float:
    face = font(size)
    for line in lines:
        width = face.getlength(line)
        draw.text((x - width / 2 if center else x, y), line, font=face, fill=fill)
        y += size * spacing
    return y


# --------------------------------------------------------------------------------------------------------------
# Layouts: each draws the picture area (VISUAL) of one card


def _center() -> tuple[float, float]:
    x0, y0, x1, y1 = VISUAL
    return (x0 + x1) / 2, (y0 + y1) / 2


def _box() -> tuple[int, int]:
    x0, y0, x1, y1 = VISUAL
    return x1 - x0, y1 - y0


def layout_mask(canvas, api, row, pics):
    """Inpaint: the picture with its transparent area (the MASK Load Image gives) tinted."""
    image = picture(pics[0][0])
    mask = Image.fromarray(255 - np.asarray(image.getchannel("A")), "L")
    shown = fit(tinted(image.convert("RGB"), mask), *_box())
    box = paste(canvas, shown, _center())
    ys, xs = np.nonzero(np.asarray(mask.resize(shown.size)) > 128)
    badge(ImageDraw.Draw(canvas), "repaint", (box[0] + xs.mean(), box[1] + ys.mean()))


def layout_outpaint(canvas, api, row, pics):
    """Outpaint: the picture inside the bigger canvas the workflow makes, the new area hatched."""
    node = next(n["inputs"] for n in api.values() if n["class_type"] == "EditKitFluxFillOutpaint")
    image = picture(pics[0][0]).convert("RGB")
    left, top, right, bottom = (node[k] for k in ("left", "top", "right", "bottom"))
    full = Image.new("RGB", (image.width + left + right, image.height + top + bottom), PANEL)
    draw = ImageDraw.Draw(full)
    for offset in range(-full.height, full.width, 36):  # hatching: the area to fill
        draw.line([offset, full.height, offset + full.height, 0], fill=(90, 96, 112), width=10)
    full.paste(image, (left, top))
    shown = fit(full, *_box())
    box = paste(canvas, shown, _center())
    scale = shown.width / full.width
    draw = ImageDraw.Draw(canvas)
    cy = (box[1] + box[3]) / 2
    for amount, x_edge, sign in ((left, box[0], -1), (right, box[2], 1)):
        if amount:
            inner = x_edge - sign * amount * scale
            badge(draw, f"+{amount} px", ((x_edge + inner) / 2, cy - 40))
            arrow(draw, inner, x_edge, cy + 10)
    for amount, y_edge, sign in ((top, box[1], -1), (bottom, box[3], 1)):
        if amount:
            badge(draw, f"+{amount} px", ((box[0] + box[2]) / 2, y_edge - sign * amount * scale / 2))


def _two_panels(canvas, left: Image.Image, right: Image.Image, labels: tuple[str, str]) -> None:
    width, height = _box()
    panel = (width - 70) // 2
    cx, cy = _center()
    a = paste(canvas, fit(left, panel, height - 36), (VISUAL[0] + panel / 2, cy - 14))
    b = paste(canvas, fit(right, panel, height - 36), (VISUAL[2] - panel / 2, cy - 14))
    draw = ImageDraw.Draw(canvas)
    arrow(draw, a[2] + 10, b[0] - 10, cy - 14)
    for text, box in zip(labels, (a, b)):
        text_block(draw, [text], (box[0] + box[2]) / 2, box[3] + 8, LABEL_SIZE, MUTED)


def layout_cutout(canvas, api, row, pics):
    """Background removal: the picture, then the cut-out (its silhouette) over a transparency checkerboard."""
    name = pics[0][0]
    image = picture(name).convert("RGB")
    cut = checker(image.width, image.height, 24)
    cut.paste(image, (0, 0), subject_mask(name))
    _two_panels(canvas, image, cut, ("picture", "cut-out + mask"))


def layout_subject_edit(canvas, api, row, pics):
    """Edit inside BEN2's subject mask: the picture with the subject tinted."""
    name = pics[0][0]
    image = picture(name).convert("RGB")
    box = paste(canvas, fit(tinted(image, subject_mask(name), strength=0.45), *_box()), _center())
    badge(ImageDraw.Draw(canvas), "edited", ((box[0] + box[2]) / 2, box[1] + (box[3] - box[1]) * 0.55))


def layout_background_edit(canvas, api, row, pics):
    """Repaint all but the subject: the picture with the background tinted."""
    name = pics[0][0]
    image = picture(name).convert("RGB")
    background = Image.fromarray(255 - np.asarray(subject_mask(name)), "L")
    box = paste(canvas, fit(tinted(image, background, strength=0.5), *_box()), _center())
    badge(ImageDraw.Draw(canvas), "repaint", (box[0] + (box[2] - box[0]) * 0.2, box[1] + 40))


def layout_instruction(canvas, api, row, pics):
    """An instruction edit: the picture to edit (the instruction is quoted under it)."""
    paste(canvas, fit(picture(pics[0][0]).convert("RGB"), *_box()), _center())


def layout_references(canvas, api, row, pics):
    """Several pictures side by side, numbered as the prompt names them."""
    width, height = _box()
    count = len(pics)
    gap = 34
    cell = (width - gap * (count - 1)) / count
    cy = _center()[1] - 14
    draw = ImageDraw.Draw(canvas)
    for index, (name, title) in enumerate(pics):
        cx = VISUAL[0] + cell / 2 + index * (cell + gap)
        box = paste(canvas, fit(picture(name).convert("RGB"), int(cell), height - 70), (cx, cy))
        badge(draw, str(index + 1), (box[0] + 18, box[1] + 18), fill=ACCENT)
        label = title.split(":", 1)[-1].strip() or f"picture {index + 1}"
        text_block(draw, wrap(label, font(LABEL_SIZE - 2), int(cell) + gap - 4, 2), cx, box[3] + 8,
                   LABEL_SIZE - 2, MUTED)
        if index:
            text_block(draw, ["+"], cx - cell / 2 - gap / 2, cy - 22, 40, ACCENT)


def layout_rounds(canvas, api, row, pics):
    """Multi-round editing: the picture, then the numbered instructions, one per round."""
    width, height = _box()
    box = paste(canvas, fit(picture(pics[0][0]).convert("RGB"), 190, height), (VISUAL[0] + 95, _center()[1]))
    draw = ImageDraw.Draw(canvas)
    instructions = [line.strip() for line in (quoted(api, row) or "").splitlines() if line.strip()]
    x = box[2] + 20
    room = VISUAL[2] - x
    y = VISUAL[1] + 4
    size = 22
    step = (height - 8) / max(len(instructions), 1)
    for number, text in enumerate(instructions, start=1):
        badge(draw, str(number), (x + 14, y + 15), size=size)
        lines = wrap(text, font(size), room - 36, 2)
        text_block(draw, lines, x + 34, y, size, TEXT, center=False, spacing=1.1)
        y += step


def layout_variations(canvas, api, row, pics):
    """Variations: the picture, then frames for the new pictures (batch_size of them) to come."""
    count = max(n["inputs"].get("batch_size", 1) for n in api.values() if n["class_type"] == "EditKitFluxSampler")
    width, height = _box()
    cy = _center()[1]
    source = picture(pics[0][0]).convert("RGB")
    a = paste(canvas, fit(source, 200, height - 20), (VISUAL[0] + 100, cy))
    draw = ImageDraw.Draw(canvas)
    ghost = fit(source, 96, 96).filter(ImageFilter.GaussianBlur(4))
    ghost = Image.blend(ghost, Image.new("RGB", ghost.size, PANEL), 0.55)
    columns = 2
    cell = 116
    x0 = VISUAL[2] - columns * cell
    rows = -(-count // columns)
    y0 = cy - rows * cell / 2
    arrow(draw, a[2] + 12, x0 - 8, cy)
    for index in range(count):
        cx, cyy = x0 + (index % columns + 0.5) * cell, y0 + (index // columns + 0.5) * cell
        paste(canvas, ghost, (cx, cyy))
        text_block(draw, ["?"], cx, cyy - 24, 40, TEXT)


def layout_blend(canvas, api, row, pics):
    """A blend of two pictures with their weights, then a cross-fade as the idea of the mix."""
    node = next(n["inputs"] for n in api.values() if n["class_type"] == "EditKitReduxEncode")
    weights = [float(w) for w in node["weights"].split(",")] if node.get("weights") else [0.5, 0.5]
    width, height = _box()
    cell = 132
    cy = _center()[1] - 16
    images = [fit(picture(name).convert("RGB"), cell, cell) for name, _t in pics[:2]]
    square = [Image.new("RGB", (cell, cell), PANEL) for _ in images]
    for base, image in zip(square, images):
        base.paste(image, ((cell - image.width) // 2, (cell - image.height) // 2))
    draw = ImageDraw.Draw(canvas)
    xs = [VISUAL[0] + cell / 2, VISUAL[0] + cell * 1.5 + 40]
    for x, base, weight in zip(xs, square, weights):
        box = paste(canvas, base, (x, cy))
        badge(draw, f"{weight:.0%}", (x, box[3] + 22))
    text_block(draw, ["+"], (xs[0] + xs[1]) / 2, cy - 24, 40, ACCENT)
    mix = Image.blend(square[0], square[1], weights[1] / max(sum(weights[:2]), 1e-6))
    right = VISUAL[2] - cell / 2
    arrow(draw, xs[1] + cell / 2 + 10, right - cell / 2 - 10, cy)
    box = paste(canvas, mix, (right, cy))
    text_block(draw, ["blend"], right, box[3] + 10, LABEL_SIZE, MUTED)


def _frame(draw, box, label: str) -> None:
    x0, y0, x1, y1 = box
    for x in range(int(x0), int(x1), 16):  # dashed: a picture to come
        draw.line([x, y0, min(x + 9, x1), y0], fill=TEXT, width=3)
        draw.line([x, y1, min(x + 9, x1), y1], fill=TEXT, width=3)
    for y in range(int(y0), int(y1), 16):
        draw.line([x0, y, x0, min(y + 9, y1)], fill=TEXT, width=3)
        draw.line([x1, y, x1, min(y + 9, y1)], fill=TEXT, width=3)
    text_block(draw, [label], (x0 + x1) / 2, (y0 + y1) / 2 - LABEL_SIZE * 0.6, LABEL_SIZE, MUTED)


def layout_prompt(canvas, api, row, pics):
    """Text to image: the prompt on a card, then the frame of the picture it makes (its size)."""
    sampler = next(n["inputs"] for n in api.values() if "width" in n["inputs"] and "height" in n["inputs"])
    width, height = sampler["width"], sampler["height"]
    x0, y0, x1, y1 = VISUAL
    card = (x0, y0 + 20, x0 + 236, y1 - 20)
    draw = ImageDraw.Draw(canvas)
    draw.rounded_rectangle(card, radius=14, fill=(236, 236, 230))
    lines = wrap(quoted(api, row) or "", font(23), card[2] - card[0] - 28, 8)
    text_block(draw, lines, card[0] + 14, card[1] + 14, 23, (30, 30, 34), center=False, spacing=1.2)
    scale = min(170 / width, (y1 - y0 - 40) / height)
    fw, fh = width * scale, height * scale
    cx, cy = x1 - 100, (y0 + y1) / 2
    arrow(draw, card[2] + 10, cx - fw / 2 - 10, cy)
    _frame(draw, (cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2), f"{width} x {height}")


def layout_stages(canvas, api, row, pics):
    """Progressive generation: one frame per stage at its size (to scale), each labelled with its work."""
    plan = stages(api)
    x0, y0, x1, y1 = VISUAL
    gap = 40
    tallest = max(s["size"][1] for s in plan)
    total = sum(s["size"][0] for s in plan)
    scale = min((x1 - x0 - gap * (len(plan) - 1)) / total, (y1 - y0 - 70) / tallest)
    draw = ImageDraw.Draw(canvas)
    x = x0 + (x1 - x0 - (total * scale + gap * (len(plan) - 1))) / 2
    bottom = y1 - 64
    for index, stage in enumerate(plan):
        w, h = stage["size"][0] * scale, stage["size"][1] * scale
        box = (x, bottom - h, x + w, bottom)
        draw.rectangle(box, fill=PANEL)
        _frame(draw, box, "")
        badge(draw, str(index + 1), (x + w / 2, bottom - h / 2), size=24)
        work = f"{stage['steps']} steps" + (f", {stage['denoise']:g}" if stage["denoise"] is not None else "")
        text_block(draw, [f"{stage['size'][0]}x{stage['size'][1]}", work], x + w / 2, bottom + 6, 21, MUTED,
                   spacing=1.05)
        if index:
            arrow(draw, x - gap + 4, x - 4, bottom - 20)
        x += w + gap


def layout_layers(canvas, api, row, pics):
    """Decomposition: the picture, then a stack of transparent layers (the background, the person)."""
    node = next(n["inputs"] for n in api.values() if n["class_type"] == "EditKitQwenImageLayered")
    count = int(node.get("layers", 4))
    name = pics[0][0]
    image = picture(name).convert("RGB")
    width, height = _box()
    cy = _center()[1] - 10
    a = paste(canvas, fit(image, 180, height - 40), (VISUAL[0] + 90, cy))
    draw = ImageDraw.Draw(canvas)
    size = 150
    step = 18
    left = VISUAL[2] - size - step * (count - 1)
    arrow(draw, a[2] + 10, left - 10, cy)
    mask = subject_mask(name)
    layers = []
    for index in range(count):
        layer = checker(image.width, image.height, 32)
        if index == 0:
            layer = image.convert("RGBA")
        elif index == count - 1:
            layer.paste(image, (0, 0), mask)
        layers.append(fit(layer, size, size))
    for index, layer in enumerate(layers):
        paste(canvas, layer, (left + size / 2 + index * step, cy - (count - 1) * step / 2 + index * step))
    text_block(draw, [f"{count} layers"], VISUAL[2] - size / 2 - 10, cy + size / 2 + (count - 1) * step / 2 + 6,
               LABEL_SIZE, MUTED)


LAYOUTS = {
    "mask": layout_mask, "outpaint": layout_outpaint, "cutout": layout_cutout, "subject_edit": layout_subject_edit,
    "background_edit": layout_background_edit, "instruction": layout_instruction, "references": layout_references,
    "rounds": layout_rounds, "variations": layout_variations, "blend": layout_blend, "prompt": layout_prompt,
    "stages": layout_stages, "layers": layout_layers,
}
QUOTE_UNDER = {"mask", "outpaint", "subject_edit", "background_edit", "instruction", "references", "stages"}


# --------------------------------------------------------------------------------------------------------------
# A card


def render(name: str, api: dict, row: dict) -> Image.Image:
    """The thumbnail of one workflow, as an RGB picture (SIZE x SIZE)."""
    if row.get("layout") not in LAYOUTS:
        raise ThumbnailError(f"{name}: unknown layout {row.get('layout')!r}; one of {', '.join(LAYOUTS)}")
    canvas = Image.new("RGBA", (SIZE, SIZE), (*BACKGROUND, 255))
    draw = ImageDraw.Draw(canvas)
    text_block(draw, [row["title"]], SIZE / 2, 20, TITLE_SIZE, TEXT)
    LAYOUTS[row["layout"]](canvas, api, row, pictures(api, row))
    draw = ImageDraw.Draw(canvas)
    y = VISUAL[3] + 10
    text = quoted(api, row) if row["layout"] in QUOTE_UNDER else None
    if text:
        y = text_block(draw, wrap(f"“{text}”", font(QUOTE_SIZE), SIZE - 44, 2), SIZE / 2, y, QUOTE_SIZE, ACCENT)
    text_block(draw, [row["caption"]], SIZE / 2, SIZE - CAPTION_SIZE * 1.5, CAPTION_SIZE, MUTED)
    return canvas.convert("RGB")


def encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=QUALITY, optimize=True, progressive=True)
    return buffer.getvalue()


def difference(path: Path, image: Image.Image) -> float:
    """Mean absolute difference (0..255) between a committed JPEG and a fresh drawing (JPEG loss is ~1)."""
    with Image.open(path) as saved:
        if saved.size != image.size:
            return 255.0
        return float(np.abs(np.asarray(saved.convert("RGB"), np.int16) - np.asarray(image, np.int16)).mean())


STALE_ABOVE = 4.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every workflows/api/*.json)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a thumbnail is stale")
    parser.add_argument("--out-dir", help="write the thumbnails here instead of workflows/")
    args = parser.parse_args(argv)
    table = load_table()
    names = args.names or sorted(p.stem for p in API_DIR.glob("*.json"))
    out_dir = Path(args.out_dir) if args.out_dir else WORKFLOWS
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for name in names:
        if name not in table:
            print(f"FAILED {name}: no row in {TABLE.relative_to(ROOT)}; add one (layout, title, caption)",
                  file=sys.stderr)
            failures += 1
            continue
        api = json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))
        image = render(name, api, table[name])
        target = out_dir / f"{name}.jpg"
        if args.check:
            if not target.is_file() or difference(target, image) > STALE_ABOVE:
                print(f"FAILED {name}: {target} is missing or out of date; run scripts/make_thumbnails.py",
                      file=sys.stderr)
                failures += 1
            continue
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(encode(image))
        os.replace(partial, target)
        print(f"wrote {target}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
