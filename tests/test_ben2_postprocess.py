"""Background-removal post-processing on a synthetic image whose alpha and colours are known exactly.

The sample is ``I = alpha * F + (1 - alpha) * B`` with an anti-aliased disk plus thin,
semi-transparent "hair" strands as alpha. A stand-in predictor that returns that alpha
replaces BEN2, so the tests measure the post-processing alone, through the same pipeline
and node the real network uses.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from editkit.nodes.ben2_nodes import EditKitBEN2RemoveBackground, EditKitRefineForeground
from editkit.pipelines.ben2 import (
    RemovalSettings,
    composite,
    estimate_foreground,
    feather_mask,
    grow_mask,
    invert_mask,
    parse_hex_color,
    refine_mask,
    remove_background,
    threshold_mask,
)
from editkit.pipelines.ben2.postprocess import box_blur
from editkit.pipelines.core.errors import EditKitError
from editkit.pipelines.core.runtime import Component, TorchRuntime
from node_calls import call_node

SIZE = 256
RADIUS = 60


def synthetic_sample(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, alpha, foreground, background) as ``[1,3|1,H,W]`` tensors in 0..1."""
    gen = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    checker = ((x // 16 + y // 16) % 2).float()
    background = torch.stack((0.15 + 0.7 * x / size, 0.3 + 0.4 * checker, 0.85 - 0.7 * y / size))
    foreground = torch.stack(
        (0.8 + 0.15 * torch.sin(x / 9), 0.25 + 0.1 * torch.cos(y / 7), 0.1 + 0.05 * torch.sin((x + y) / 5))
    )
    foreground = (foreground + 0.03 * torch.randn(foreground.shape, generator=gen)).clamp(0, 1)

    centre = size / 2
    r = torch.sqrt((x - centre) ** 2 + (y - centre) ** 2)
    alpha = (0.5 - (r - RADIUS) / 2.0).clamp(0, 1)  # anti-aliased disk, ~2 px soft edge
    for k in range(8):  # hair: thin strands leaving the disk, at most 60% opaque
        angle = 2 * math.pi * k / 8 + 0.2
        dx, dy = math.cos(angle), math.sin(angle)
        along = (x - centre) * dx + (y - centre) * dy
        across = (-(x - centre) * dy + (y - centre) * dx).abs()
        strand = 0.6 * (1 - across).clamp(0, 1) * ((along > RADIUS - 2) & (along < RADIUS + 50)).float()
        alpha = torch.maximum(alpha, strand)
    image = alpha * foreground + (1 - alpha) * background
    return image[None], alpha[None, None], foreground[None], background[None]


def soft_band(alpha: torch.Tensor) -> torch.Tensor:
    return ((alpha > 0.02) & (alpha < 0.98)).expand(-1, 3, -1, -1)


def foreground_error(estimate: torch.Tensor, truth: torch.Tensor, alpha: torch.Tensor) -> float:
    band = soft_band(alpha)
    return (estimate - truth).abs()[band].mean().item()


def disk(radius: float, size: int = 128) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((x - size // 2) ** 2 + (y - size // 2) ** 2) <= radius**2).float()[None, None]


class AlphaStandIn(torch.nn.Module):
    """Stand-in for BEN2: returns the known alpha of each image, in batch order."""

    def __init__(self, alpha: torch.Tensor):
        super().__init__()
        self.alpha = alpha
        self.cursor = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.alpha[self.cursor : self.cursor + x.shape[0]]
        self.cursor += x.shape[0]
        assert out.shape[-2:] == x.shape[-2:], "tests run the stand-in at the image's own size"
        return out.to(x.dtype)


def stand_in(alpha: torch.Tensor) -> Component:
    return Component(AlphaStandIn(alpha), kind="segmentation", name="known alpha", dtype=torch.float32)


def as_comfy_image(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(1, -1).contiguous()


# --- mask shaping --------------------------------------------------------------------


def test_threshold_gives_a_binary_mask():
    _, alpha, _, _ = synthetic_sample()
    hard = threshold_mask(alpha, 0.5)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(hard.bool(), alpha >= 0.5)
    assert threshold_mask(alpha, 0.0) is alpha  # 0 keeps the soft matte


def test_grow_increases_area_monotonically_and_shrink_decreases_it():
    mask = disk(20)
    radii = [0, 1, 2, 3, 5, 8, 13, 21]
    grown = [grow_mask(mask, r).sum().item() for r in radii]
    shrunk = [grow_mask(mask, -r).sum().item() for r in radii]
    assert all(a < b for a, b in zip(grown, grown[1:]))
    assert all(a > b for a, b in zip(shrunk, shrunk[1:]))
    for r, area in zip(radii, grown):
        assert area == pytest.approx(math.pi * (20 + r) ** 2, rel=0.1)  # close to a disk of radius 20 + r


def test_grow_is_nearly_isotropic():
    dot = torch.zeros(1, 1, 81, 81)
    dot[..., 40, 40] = 1
    grown = grow_mask(dot, 30)[0, 0]
    assert grown[40, 70] == 1 and grown[40, 71] == 0  # reaches exactly 30 px along the axis
    diagonal = int(30 / math.sqrt(2))
    assert grown[40 + diagonal, 40 + diagonal] == 1 and grown[40 + diagonal + 2, 40 + diagonal + 2] == 0
    assert grown.sum().item() == pytest.approx(math.pi * 30**2, rel=0.08)


def test_grow_and_shrink_work_on_soft_mattes_and_keep_the_border():
    _, alpha, _, _ = synthetic_sample()
    assert (grow_mask(alpha, 4) >= alpha).all() and (grow_mask(alpha, -4) <= alpha).all()
    full = torch.ones(1, 1, 32, 32)
    assert torch.equal(grow_mask(full, -5), full)  # the image border is not background


def test_feather_softens_the_edge_within_range():
    mask = disk(30)
    soft = feather_mask(mask, 8)
    assert soft.min() >= 0 and soft.max() <= 1
    soft_pixels = ((soft > 0.01) & (soft < 0.99)).sum().item()
    assert soft_pixels > 2 * math.pi * 30 * 6  # a soft ring at least 6 px wide around the r=30 disk
    assert soft.sum().item() == pytest.approx(mask.sum().item(), rel=0.01)  # no growth or shrink on average
    assert feather_mask(mask, 0) is mask


def test_invert_and_refine_order():
    _, alpha, _, _ = synthetic_sample()
    assert torch.equal(invert_mask(alpha), 1 - alpha)
    plain = refine_mask(alpha, threshold=0.3, grow=3, feather=2)
    torch.testing.assert_close(refine_mask(alpha, threshold=0.3, grow=3, feather=2, invert=True), 1 - plain)
    assert torch.equal(plain, feather_mask(grow_mask(threshold_mask(alpha, 0.3), 3), 2))


# --- foreground colour and output image ----------------------------------------------


@pytest.mark.parametrize("size", [5, 6, 31])
def test_box_blur_is_a_window_mean(size):
    x = torch.rand(2, 3, 40, 50, generator=torch.Generator().manual_seed(1))
    before = size // 2
    padded = F.pad(x, (before, size - 1 - before, before, size - 1 - before), mode="replicate")
    torch.testing.assert_close(box_blur(x, size), F.avg_pool2d(padded, size, stride=1), atol=1e-5, rtol=0)


def test_foreground_estimation_removes_background_colour_at_soft_edges():
    image, alpha, foreground, _ = synthetic_sample()
    naive = foreground_error(image, foreground, alpha)  # plain cut-out keeps the mixed colour
    refined = foreground_error(estimate_foreground(image, alpha), foreground, alpha)
    assert refined < 0.5 * naive
    opaque = (alpha == 1).expand(-1, 3, -1, -1)
    torch.testing.assert_close(estimate_foreground(image, alpha)[opaque], image[opaque], atol=1e-4, rtol=0)


def test_composite_over_colour_and_rgba():
    image, alpha, _, _ = synthetic_sample()
    rgba = composite(image, alpha, None)
    assert rgba.shape == (1, SIZE, SIZE, 4)
    assert torch.equal(rgba[..., 3], alpha[:, 0])
    over_green = composite(image, alpha, (0.0, 1.0, 0.0))
    assert over_green.shape == (1, SIZE, SIZE, 3)
    assert torch.equal(over_green[0, 0, 0], torch.tensor([0.0, 1.0, 0.0]))  # alpha 0 in the corner
    centre = SIZE // 2
    torch.testing.assert_close(over_green[0, centre, centre], image[0, :, centre, centre])


def test_parse_hex_color():
    assert parse_hex_color("#FFFFFF") == (1.0, 1.0, 1.0)
    assert parse_hex_color("00ff00") == (0.0, 1.0, 0.0)
    assert parse_hex_color("#f00") == (1.0, 0.0, 0.0)
    for bad in ("white", "#12345", "#GGGGGG", ""):
        with pytest.raises(EditKitError, match="hex colour"):
            parse_hex_color(bad)


# --- through the pipeline and the nodes, with the stand-in predictor --------------------


def batch_of_three() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subject, empty frame, all-subject frame: (images, alphas, true foregrounds)."""
    image, alpha, foreground, background = synthetic_sample()
    images = torch.cat((image, background, foreground))
    alphas = torch.cat((alpha, torch.zeros_like(alpha), torch.ones_like(alpha)))
    return images, alphas, torch.cat((foreground, foreground, foreground))


def test_pipeline_processes_every_image_with_the_exact_matte():
    images, alphas, foregrounds = batch_of_three()
    settings = RemovalSettings(resolution=SIZE, batch_size=2, refine_foreground=True, background=None)
    out, masks = remove_background(
        stand_in(alphas), as_comfy_image(images), runtime=TorchRuntime("cpu"), settings=settings
    )
    assert masks.shape == (3, SIZE, SIZE) and out.shape == (3, SIZE, SIZE, 4)
    torch.testing.assert_close(masks, alphas[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., 3], masks)
    assert masks[1].max() == 0 and masks[2].min() == 1  # empty stays empty, no min-max stretch
    rgb = out[..., :3].movedim(-1, 1)
    assert foreground_error(rgb[:1], foregrounds[:1], alphas[:1]) < 0.5 * foreground_error(
        images[:1], foregrounds[:1], alphas[:1]
    )


def test_node_mask_options(torch_runtime):
    images, alphas, _ = batch_of_three()
    node = EditKitBEN2RemoveBackground
    common = {"image": as_comfy_image(images), "resolution": SIZE}
    _, soft = call_node(node, ben2_model=stand_in(alphas), **common)
    torch.testing.assert_close(soft, alphas[:, 0], atol=1e-6, rtol=0)
    _, inverted = call_node(node, ben2_model=stand_in(alphas), invert=True, **common)
    torch.testing.assert_close(inverted, 1 - soft)  # mask-only use: "everything but the subject"
    _, hard = call_node(node, ben2_model=stand_in(alphas), threshold=0.5, **common)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    _, grown = call_node(node, ben2_model=stand_in(alphas), threshold=0.5, grow=6, **common)
    assert grown[0].sum() > hard[0].sum()
    _, feathered = call_node(node, ben2_model=stand_in(alphas), threshold=0.5, feather=5, **common)
    assert feathered.min() >= 0 and feathered.max() <= 1 and ((feathered > 0) & (feathered < 1)).any()


def test_node_image_outputs(torch_runtime):
    images, alphas, foregrounds = batch_of_three()
    node = EditKitBEN2RemoveBackground
    common = {"image": as_comfy_image(images), "resolution": SIZE}
    white, _ = call_node(node, ben2_model=stand_in(alphas), **common)
    assert white.shape == (3, SIZE, SIZE, 3)
    assert torch.equal(white[1], torch.ones(SIZE, SIZE, 3))  # empty frame: only the background colour
    rgba, mask = call_node(node, ben2_model=stand_in(alphas), background="alpha (RGBA)", **common)
    assert rgba.shape == (3, SIZE, SIZE, 4) and torch.equal(rgba[..., 3], mask)
    naive, _ = call_node(node, ben2_model=stand_in(alphas), background="alpha (RGBA)", refine_foreground=False, **common)
    truth = foregrounds[:1]
    assert foreground_error(rgba[:1, ..., :3].movedim(-1, 1), truth, alphas[:1]) < 0.5 * foreground_error(
        naive[:1, ..., :3].movedim(-1, 1), truth, alphas[:1]
    )
    with pytest.raises(EditKitError, match="hex colour"):
        call_node(node, ben2_model=stand_in(alphas), background_color="blue", **common)


def test_refine_foreground_node_accepts_any_mask():
    image, alpha, foreground, _ = synthetic_sample()
    images = as_comfy_image(torch.cat((image, image)))
    (out,) = call_node(EditKitRefineForeground, image=images, mask=alpha[:, 0], background="alpha (RGBA)")
    assert out.shape == (2, SIZE, SIZE, 4)  # one mask applied to both images
    refined = foreground_error(out[:1, ..., :3].movedim(-1, 1), foreground, alpha)
    assert refined < 0.5 * foreground_error(image, foreground, alpha)
    with pytest.raises(EditKitError, match="Mask is"):
        call_node(EditKitRefineForeground, image=images, mask=alpha[:, 0, :100])


# --- issue 8, item 1: refine on the network's matte, cut out with the shaped mask ------------


@pytest.mark.parametrize("grow, feather", [(0, 4), (0, 8), (-3, 6)])
def test_refine_foreground_keeps_fully_subject_pixels_when_the_mask_is_shaped(grow, feather):
    """Pixels the network calls fully subject keep their exact colour, however the mask is shaped.

    Refining on the feathered/shrunk mask changed them by 0.003-0.014 on average (issue 8)."""
    image, alpha, _, _ = synthetic_sample()
    settings = RemovalSettings(resolution=SIZE, grow=grow, feather=feather, refine_foreground=True, background=None)
    out, mask = remove_background(stand_in(alpha), as_comfy_image(image), runtime=TorchRuntime("cpu"), settings=settings)
    torch.testing.assert_close(mask[0], refine_mask(alpha, grow=grow, feather=feather)[0, 0])  # shaped MASK output
    torch.testing.assert_close(out[..., 3], mask)  # cut out with the shaped mask
    subject = (alpha == 1).expand(-1, 3, -1, -1)
    assert subject.sum() > 5000
    rgb = out[..., :3].movedim(-1, 1)
    assert (rgb - image).abs()[subject].max() < 1e-5


def test_refine_foreground_with_a_shrunk_feathered_mask_beats_no_refine():
    """grow -3, feather 6: refining must lower the edge-colour error, not raise it (issue 8: it rose)."""
    image, alpha, foreground, _ = synthetic_sample()
    errors = {}
    for refine in (True, False):
        settings = RemovalSettings(resolution=SIZE, grow=-3, feather=6, refine_foreground=refine, background=None)
        out, _ = remove_background(
            stand_in(alpha), as_comfy_image(image), runtime=TorchRuntime("cpu"), settings=settings
        )
        errors[refine] = foreground_error(out[..., :3].movedim(-1, 1), foreground, alpha)
    assert errors[True] < 0.5 * errors[False], errors


def test_inverted_refine_estimates_the_background_colour_from_the_raw_matte():
    """With invert the kept region is the background: its colours come from 1 - matte, unchanged where the
    network saw pure background, and the shaped (inverted, feathered) mask is the alpha."""
    image, alpha, _, background = synthetic_sample()
    settings = RemovalSettings(resolution=SIZE, feather=5, invert=True, refine_foreground=True, background=None)
    out, mask = remove_background(stand_in(alpha), as_comfy_image(image), runtime=TorchRuntime("cpu"), settings=settings)
    torch.testing.assert_close(mask[0], 1 - feather_mask(alpha, 5)[0, 0])
    rgb = out[..., :3].movedim(-1, 1)
    pure_background = (alpha == 0).expand(-1, 3, -1, -1)
    assert (rgb - image).abs()[pure_background].max() < 1e-5
    naive = foreground_error(image, background, 1 - alpha)
    assert foreground_error(rgb, background, 1 - alpha) < 0.5 * naive


def test_refine_foreground_node_says_which_mask_it_expects():
    text = EditKitRefineForeground.DESCRIPTION
    assert "soft matte" in text and "before" in text and "feather" in text
