"""BEN2 checkpoint files: both published layouts, strict validation, clear errors, no code execution."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from editkit.pipelines.ben2 import BEN2Base, BEN2Config, load_ben2, read_state_dict, save_ben2_checkpoint
from editkit.pipelines.ben2.checkpoint import infer_config
from editkit.pipelines.core.errors import ModelFileError


@pytest.fixture(scope="module")
def tiny() -> BEN2Base:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return BEN2Base(BEN2Config.tiny()).eval()


@pytest.fixture(scope="module")
def tiny_state(tiny) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny.state_dict().items()}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["ben2.safetensors", "BEN2_Base.pth"])
def test_round_trip_through_both_published_layouts(tiny, tmp_path, name):
    path = save_ben2_checkpoint(tiny, tmp_path / name)
    loaded = load_ben2(path)
    assert loaded.config == BEN2Config.tiny()
    assert _same_weights(tiny, loaded)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(tiny(images), loaded(images))


def test_file_layouts_are_the_published_ones(tiny, tmp_path):
    flat = safetensors.torch.load_file(str(save_ben2_checkpoint(tiny, tmp_path / "m.safetensors")))
    assert set(flat) == set(tiny.state_dict())
    wrapped = torch.load(save_ben2_checkpoint(tiny, tmp_path / "m.pth"), weights_only=True)
    assert set(wrapped) == {"model_state_dict"} and set(wrapped["model_state_dict"]) == set(flat)


def test_training_checkpoint_extras_and_prefixes_are_tolerated(tiny, tiny_state, tmp_path):
    # BEN2_Base.pth is a training checkpoint: weights plus optimizer state and counters.
    path = tmp_path / "train.pth"
    torch.save({"epoch": 7, "optimizer_state_dict": {"lr": 1e-4}, "model_state_dict": tiny_state}, path)
    assert _same_weights(tiny, load_ben2(path))
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_state.items()}}, path)
    assert _same_weights(tiny, load_ben2(path))


def test_load_casts_floats_and_keeps_index_buffers(tiny, tmp_path):
    loaded = load_ben2(save_ben2_checkpoint(tiny, tmp_path / "m.safetensors"), dtype=torch.float16)
    state = loaded.state_dict()
    assert {v.dtype for k, v in state.items() if not k.endswith("relative_position_index")} == {torch.float16}
    assert {v.dtype for k, v in state.items() if k.endswith("relative_position_index")} == {torch.int64}


def test_files_without_training_side_heads_load(tiny, tiny_state, tmp_path):
    pruned = {k: v for k, v in tiny_state.items() if not k.startswith("sideout")}
    path = save_ben2_checkpoint(pruned, tmp_path / "pruned.safetensors")
    loaded = load_ben2(path)
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded(images), tiny(images))  # side heads never take part


def test_size_is_inferred_from_shapes(tiny_state):
    assert infer_config(tiny_state) == BEN2Config.tiny()
    with torch.device("meta"):
        assert infer_config(BEN2Base().state_dict()) == BEN2Config()
    assert infer_config({"bb.layers.0.weight": torch.zeros(1)}) is None


def _error_for(state: dict[str, torch.Tensor], path: Path) -> str:
    save_ben2_checkpoint(state, path)
    with pytest.raises(ModelFileError) as info:
        load_ben2(path)
    message = str(info.value)
    assert "Not a BEN2 Base checkpoint" in message and path.name in message
    return message


def test_mis_shaped_tensor_is_named(tiny_state, tmp_path):
    state = dict(tiny_state)
    key = "backbone.layers.0.blocks.0.mlp.fc1.weight"  # also the tensor the size inference reads
    state[key] = torch.zeros(7, 16)
    message = _error_for(state, tmp_path / "bad_shape.safetensors")
    assert "1 tensors with the wrong shape" in message and key in message and "(7, 16)" in message


def test_missing_and_unexpected_tensors_are_named(tiny_state, tmp_path):
    state = dict(tiny_state)
    del state["dec_blk2.sal_conv.weight"]
    state["extra.head.weight"] = torch.zeros(3)
    message = _error_for(state, tmp_path / "bad_keys.pth")
    assert "1 tensors missing: dec_blk2.sal_conv.weight" in message
    assert "1 tensors unexpected: extra.head.weight" in message


def test_foreign_checkpoint_is_identified(tmp_path):
    birefnet_like = {
        "bb.layers.1.blocks.0.attn.relative_position_index": torch.zeros(144, 144, dtype=torch.int64),
        "decoder.conv_out1.0.weight": torch.zeros(1, 16, 1, 1),
    }
    message = _error_for(birefnet_like, tmp_path / "birefnet.safetensors")
    assert "525 tensors missing" in message and "BiRefNet" in message  # all but the optional side heads


def test_corrupted_index_buffer_is_rejected(tiny_state, tmp_path):
    state = dict(tiny_state)
    key = "backbone.layers.1.blocks.1.attn.relative_position_index"
    state[key] = state[key].flip(0)
    save_ben2_checkpoint(state, tmp_path / "flipped.safetensors")
    with pytest.raises(ModelFileError, match="window index table"):
        load_ben2(tmp_path / "flipped.safetensors")


def test_float_index_buffer_is_rejected(tiny_state, tmp_path):
    state = dict(tiny_state)
    key = "backbone.layers.0.blocks.0.attn.relative_position_index"
    state[key] = state[key].float()
    assert "integer vs float" in _error_for(state, tmp_path / "float_index.safetensors")


def test_unreadable_files_give_clear_errors(tiny, tmp_path):
    good = save_ben2_checkpoint(tiny, tmp_path / "good.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelFileError, match="Cannot read this safetensors file"):
        read_state_dict(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ModelFileError, match="Cannot read this file as a torch checkpoint"):
        read_state_dict(garbage)
    with pytest.raises(ModelFileError, match="Unsupported file type '.onnx'"):
        read_state_dict(tmp_path / "BEN2_Base.onnx")
    not_weights = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(ModelFileError, match="No state dict found"):
        read_state_dict(not_weights)


class _RunsCodeWhenUnpickled:
    """Pickles as 'call Path.touch(marker)': loading it without weights_only would run that call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_and_never_run(tiny_state, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "trojan.pth"
    torch.save({"model_state_dict": tiny_state, "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ModelFileError, match="weights_only=True"):
        load_ben2(path)
    assert not marker.exists()
