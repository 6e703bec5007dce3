"""BEN2 network: published state-dict layout and forward-pass contracts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from editkit.pipelines.ben2 import SIZE_MULTIPLE, BEN2Base, BEN2Config
from editkit.pipelines.ben2.decoder import sine_positions
from editkit.pipelines.ben2.swin import relative_position_index, shifted_window_mask
from editkit.pipelines.ben2.views import split_quadrants, split_token_quadrants, tile_quadrants

MANIFEST = Path(__file__).parent / "data" / "ben2_state_dict_manifest.tsv"


def tiny_model(seed: int = 0) -> BEN2Base:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BEN2Base(BEN2Config.tiny()).eval()


def normalized_batch(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_default_config_has_the_published_state_dict():
    with torch.device("meta"):
        model = BEN2Base()
    state = model.state_dict()
    rows = [line.rstrip("\n").split("\t") for line in MANIFEST.read_text().splitlines()]
    assert len(rows) == 535
    assert list(state) == [name for name, _, _ in rows]  # same names, same order
    for name, shape, dtype in rows:
        assert str(tuple(state[name].shape)) == shape, name
        assert str(state[name].dtype) == dtype, name
    int_buffers = [k for k, v in state.items() if v.dtype == torch.int64]
    assert len(int_buffers) == 24 and all(k.endswith("attn.relative_position_index") for k in int_buffers)
    assert sum(v.numel() for v in state.values() if v.is_floating_point()) == 94_134_658


def test_relative_position_index_matches_the_offset_table():
    # window 2: token order (0,0) (0,1) (1,0) (1,1); row = (dy + 1) * 3 + (dx + 1)
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(relative_position_index(2), expected)
    assert relative_position_index(12).shape == (144, 144)
    assert relative_position_index(12).max() == 23 * 23 - 1


def test_shifted_window_mask_separates_wrapped_regions():
    # One 4x4 window shifted by 2: four 2x2 regions that must not see each other.
    mask = shifted_window_mask(4, 4, window=4, shift=2, device="cpu", dtype=torch.float32)
    assert mask.shape == (1, 16, 16)

    def region(token: int) -> int:  # which 2x2 block of the window the token sits in
        return (token // 4 >= 2) * 2 + (token % 4 >= 2)

    for a in range(16):
        for b in range(16):
            assert mask[0, a, b] == (0.0 if region(a) == region(b) else -100.0)


def test_quadrant_helpers_are_inverse_and_agree():
    maps = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    quads = split_quadrants(maps)
    assert quads.shape == (2, 4, 3, 2, 3)
    assert torch.equal(quads[:, 1], maps[:, :, :2, 3:])  # top-right
    assert torch.equal(quads[:, 2], maps[:, :, 2:, :3])  # bottom-left
    assert torch.equal(tile_quadrants(quads), maps)
    tokens = maps.flatten(2).transpose(1, 2)
    token_quads = split_token_quadrants(tokens, 4, 6)
    assert torch.equal(token_quads, quads.flatten(3).transpose(2, 3))


def test_sine_positions_layout():
    pos = sine_positions(2, 3, 8, "cpu")
    assert pos.shape == (6, 8)
    # channel 0: sine of the row centre scaled to 2π; channel 4: same for the column.
    row_angle = 0.5 / (2 + 1e-6) * 2 * math.pi
    col_angle = 2.5 / (3 + 1e-6) * 2 * math.pi
    token = 0 * 3 + 2  # row 0, column 2
    assert pos[token, 0].item() == pytest.approx(math.sin(row_angle), abs=1e-6)
    assert pos[token, 1].item() == pytest.approx(math.cos(row_angle), abs=1e-6)
    assert pos[token, 4].item() == pytest.approx(math.sin(col_angle), abs=1e-6)
    assert pos[token, 7].item() == pytest.approx(math.cos(col_angle / 10000 ** (2 / 4)), abs=1e-6)


@pytest.mark.parametrize("height,width", [(256, 256), (384, 256), (128, 512), (128, 128)])
def test_forward_shape_range_and_finiteness(height, width):
    model = tiny_model()
    with torch.inference_mode():
        out = model(normalized_batch(2, height, width))
    assert out.shape == (2, 1, height, width)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert out.std() > 0  # a real map, not a constant


def test_batch_result_equals_per_image_results():
    model = tiny_model()
    images = normalized_batch(3, 256, 256)
    with torch.inference_mode():
        batched = model(images)
        single = torch.cat([model(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0], batched[1])  # different images, different masks


def test_forward_is_deterministic():
    model = tiny_model()
    images = normalized_batch(2, 256, 256)
    with torch.inference_mode():
        assert torch.equal(model(images), model(images))


def test_every_view_reaches_the_output():
    # The global view and all four quarters feed the mask: changing one quarter of the
    # input changes the mask in the other quarters too (through the global view).
    model = tiny_model()
    images = normalized_batch(1, 256, 256)
    edited = images.clone()
    edited[..., :128, :128] = 0
    with torch.inference_mode():
        before, after = model(images), model(edited)
    assert not torch.allclose(before[..., 128:, 128:], after[..., 128:, 128:])


@pytest.mark.parametrize("shape", [(1, 3, 200, 256), (1, 3, 256, 300), (1, 4, 256, 256)])
def test_forward_rejects_inputs_it_cannot_split(shape):
    with pytest.raises(ValueError, match=str(SIZE_MULTIPLE)):
        tiny_model()(torch.zeros(shape))


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError):
        BEN2Config(embed_dim=30, num_heads=(4, 4, 4, 4))
    with pytest.raises(ValueError):
        BEN2Config(depths=(2, 2, 2))


@pytest.mark.slow
def test_full_size_network_forward_at_256():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BEN2Base().eval()
    with torch.inference_mode():
        out = model(normalized_batch(1, 256, 256))
    assert out.shape == (1, 1, 256, 256)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
