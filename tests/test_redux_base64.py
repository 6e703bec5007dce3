"""EditKit · Load Image (base64): PNG/JPEG/WebP round trips, Load Image's mask convention, clear refusals."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from editkit.nodes.redux_nodes import EditKitLoadImageBase64
from editkit.pipelines.core.errors import EditKitError
from node_calls import call_node


def _picture(width=23, height=17, alpha=False, seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 4 if alpha else 3), dtype=np.uint8)
    return Image.fromarray(array, "RGBA" if alpha else "RGB"), array


def _b64(picture: Image.Image, fmt: str, **options) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _load(data, **kw):
    return call_node(EditKitLoadImageBase64, data=data, **kw)


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("WEBP", {"lossless": True, "exact": True})])
@pytest.mark.parametrize("alpha", [False, True])
def test_lossless_formats_round_trip_exactly(fmt, options, alpha):
    picture, array = _picture(alpha=alpha)
    image, mask = _load(_b64(picture, fmt, **options))
    assert image.shape == (1, 17, 23, 3) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.from_numpy(array[..., :3].astype(np.float32) / 255))
    assert mask.shape == (1, 17, 23)
    expected = 1 - array[..., 3].astype(np.float32) / 255 if alpha else np.zeros((17, 23), np.float32)
    assert torch.equal(mask[0], torch.from_numpy(expected))  # Load Image's rule: mask = 1 - alpha


def test_jpeg_round_trips_within_its_compression():
    picture, array = _picture(64, 48)
    picture = picture.resize((64, 48))
    smooth = picture.filter(ImageFilter.GaussianBlur(4))
    image, mask = _load(_b64(smooth, "JPEG", quality=95))
    reference = np.asarray(smooth, dtype=np.float32) / 255
    assert image.shape == (1, 48, 64, 3)
    assert float((image[0] - torch.from_numpy(reference)).abs().mean()) < 0.02
    assert not mask.any()


def test_data_url_line_breaks_and_url_safe_alphabet_are_accepted():
    picture, array = _picture(alpha=True)
    text = _b64(picture, "PNG")
    wrapped = "data:image/png;base64," + "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    image, _ = _load(wrapped)
    assert torch.equal(image[0], torch.from_numpy(array[..., :3].astype(np.float32) / 255))
    urlsafe = text.replace("+", "-").replace("/", "_").rstrip("=")
    assert torch.equal(_load(urlsafe)[0], image)


def test_palette_transparency_becomes_the_mask():
    picture = Image.new("P", (4, 3), 0)
    picture.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    picture.putpixel((1, 1), 1)
    image, mask = _load(_b64(picture, "PNG", transparency=0))
    assert torch.equal(mask[0], torch.tensor([[1.0] * 4, [1.0, 0.0, 1.0, 1.0], [1.0] * 4]))
    assert image[0, 1, 1].tolist() == [0.0, 0.0, 1.0]


def test_exif_orientation_is_applied():
    picture, _ = _picture(20, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image, _ = _load(_b64(picture, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.shape == (1, 20, 10, 3)


@pytest.mark.parametrize("data, message", [
    ("", "'data' is empty"),
    ("this is not base64!", "not valid base64"),
    (base64.b64encode(b"hello, not a picture at all").decode(), "not a picture \\(they start with 68 65 6c"),
    ("data:image/png,rawbytes", "not base64"),
])
def test_garbage_is_refused_clearly(data, message):
    with pytest.raises(EditKitError, match=message):
        _load(data)


def test_other_formats_and_damaged_pictures_are_refused():
    picture, _ = _picture()
    with pytest.raises(EditKitError, match="The picture is GIF; send PNG, JPEG or WebP"):
        _load(_b64(picture, "GIF"))
    raw = base64.b64decode(_b64(picture, "PNG"))
    truncated = base64.b64encode(raw[: len(raw) // 2]).decode()
    with pytest.raises(EditKitError, match="damaged"):
        _load(truncated)


def test_pixel_limit_is_checked_before_decoding():
    picture, _ = _picture(40, 30)
    data = _b64(picture, "PNG")
    with pytest.raises(EditKitError, match="40x30 = 1200 pixels, more than the limit of 1000"):
        _load(data, max_pixels=1000)
    assert _load(data, max_pixels=1200)[0].shape == (1, 30, 40, 3)
