"""Chunked BEN2 prediction on ComfyUI images: sizes, batching, precision of results, runtime hooks."""

from __future__ import annotations

import pytest
import torch

from editkit.pipelines.ben2 import BEN2Base, BEN2Config, predict_masks, processing_size
from editkit.pipelines.ben2.inference import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from editkit.pipelines.core.errors import EditKitError, Interrupted
from editkit.pipelines.core.runtime import Component, TorchRuntime


@pytest.fixture(scope="module")
def component() -> Component:
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = BEN2Base(BEN2Config.tiny()).eval()
    return Component(model, kind="segmentation", name="tiny BEN2", dtype=torch.float32)


def images(batch: int, height: int, width: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, height, width, channels, generator=torch.Generator().manual_seed(seed))


class RecordingRuntime(TorchRuntime):
    """CPU runtime that records what the pipeline asked of it."""

    def __init__(self):
        self.progress_events: list[tuple[int, int]] = []
        super().__init__("cpu", on_progress=lambda value, total, _preview: self.progress_events.append((value, total)))
        self.acquired: list[int] = []

    def acquire(self, component, memory_required=0):
        self.acquired.append(memory_required)
        return super().acquire(component, memory_required)


class CountingNet(torch.nn.Module):
    """Stand-in network: a constant soft mask, and a count of forward calls."""

    def __init__(self, value: float = 0.5):
        super().__init__()
        self.value = value
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full((x.shape[0], 1, *x.shape[-2:]), self.value, dtype=x.dtype)


def test_processing_size():
    assert processing_size(1080, 1920, 1024, keep_aspect=False) == (1024, 1024)
    assert processing_size(1080, 1920, 1024, keep_aspect=True) == (640, 1024)  # 576 rounds half up to 640
    assert processing_size(4000, 30, 1024, keep_aspect=True) == (1024, 128)  # never below 128
    assert processing_size(100, 100, 256, keep_aspect=True) == (256, 256)
    for bad in (0, 100, 1000):
        with pytest.raises(EditKitError, match="multiple of 128"):
            processing_size(64, 64, bad, keep_aspect=False)


def test_normalization_is_imagenet():
    grey = torch.full((1, 3, 128, 128), 0.5)
    out = normalize_images(grey, (128, 128))
    expected = torch.tensor([(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(out[0, :, 0, 0], expected)


@pytest.mark.parametrize(
    "shape,keep_aspect",
    [
        ((2, 37, 53, 3), False),  # tiny, not multiples of 128
        ((1, 1000, 20, 3), False),  # extreme tall
        ((1, 12, 900, 3), True),  # extreme wide, aspect kept
        ((1, 300, 200, 4), True),  # RGBA input: alpha ignored
    ],
)
def test_any_size_gives_float_masks_at_input_size(component, shape, keep_aspect):
    batch, height, width, channels = shape
    masks = predict_masks(
        component, images(*shape), runtime=TorchRuntime("cpu"), resolution=256, keep_aspect=keep_aspect
    )
    assert masks.shape == (batch, height, width)
    assert masks.dtype == torch.float32 and masks.device.type == "cpu"
    assert torch.isfinite(masks).all() and masks.min() >= 0 and masks.max() <= 1


def test_alpha_channel_does_not_change_the_mask(component):
    rgb = images(1, 128, 128)
    rgba = torch.cat((rgb, torch.rand(1, 128, 128, 1)), dim=-1)
    runtime = TorchRuntime("cpu")
    torch.testing.assert_close(
        predict_masks(component, rgb, runtime=runtime, resolution=128),
        predict_masks(component, rgba, runtime=runtime, resolution=128),
        rtol=0,
        atol=0,
    )


def test_chunking_does_not_change_results(component):
    batch = images(5, 200, 160, seed=3)
    runtime = TorchRuntime("cpu")
    whole = predict_masks(component, batch, runtime=runtime, resolution=256, batch_size=5)
    chunked = predict_masks(component, batch, runtime=runtime, resolution=256, batch_size=2)
    single = torch.cat([predict_masks(component, batch[i : i + 1], runtime=runtime, resolution=256) for i in range(5)])
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole, single, atol=1e-5, rtol=0)


def test_masks_are_not_quantised_or_stretched():
    # The reference min-max stretches and rounds to 8 bits: a constant 0.5 prediction
    # would become NaN there. Here it stays exactly 0.5.
    net = CountingNet(0.5)
    component = Component(net, kind="segmentation", name="constant", dtype=torch.float32)
    masks = predict_masks(component, images(2, 64, 96), runtime=TorchRuntime("cpu"), resolution=128)
    assert torch.equal(masks, torch.full((2, 64, 96), 0.5))
    net.value = 0.123456789
    masks = predict_masks(component, images(1, 64, 96), runtime=TorchRuntime("cpu"), resolution=128)
    assert torch.allclose(masks, torch.tensor(0.123456789), atol=1e-7)  # no 1/255 steps


def test_progress_acquire_and_chunk_count():
    net = CountingNet()
    component = Component(net, kind="segmentation", name="constant", dtype=torch.float32)
    runtime = RecordingRuntime()
    predict_masks(component, images(5, 32, 32), runtime=runtime, resolution=256, batch_size=2)
    assert net.calls == 3
    assert runtime.progress_events == [(1, 3), (2, 3), (3, 3)]
    assert len(runtime.acquired) == 1 and runtime.acquired[0] > 2 * 256 * 256  # an activation estimate, in bytes


def test_interrupt_stops_between_chunks():
    net = CountingNet()
    component = Component(net, kind="segmentation", name="constant", dtype=torch.float32)
    runtime = RecordingRuntime()
    runtime.on_progress = lambda value, total, _preview: runtime.interrupt()  # user presses cancel during chunk 1
    with pytest.raises(Interrupted):
        predict_masks(component, images(6, 32, 32), runtime=runtime, resolution=128, batch_size=2)
    assert net.calls == 1


def test_bad_batch_size_is_a_user_error(component):
    with pytest.raises(EditKitError, match="batch_size"):
        predict_masks(component, images(1, 32, 32), runtime=TorchRuntime("cpu"), resolution=128, batch_size=0)
