"""Tiny random FLUX.1 Redux prior and FLUX.1-dev transformer, in the real file formats.

Written into the tiny models tree by ``make_tiny_models`` (and usable on their own):

    diffusers/FLUX.1-Redux-dev/          FluxPriorReduxPipeline.save_pretrained (image_encoder,
                                         image_embedder, feature_extractor; no text encoders)
    style_models/flux1-redux-dev.safetensors           the embedder alone, bf16 (as released)
    clip_vision/sigclip_vision_patch14_384.safetensors SigLIP alone, fp16, without the pooling head
    diffusion_models/flux1-dev.safetensors             a 64-feature FLUX.1 transformer, BFL layout
    diffusers/FLUX.1-dev/                FLUX.1-Fill-dev's tiny folder with that transformer instead
                                         (text encoders for the prompt + picture workflow)

The tiny SigLIP keeps so400m's 72-wide attention heads (2 of them) and a 27x27 token grid
(patch 2 on 54 px), so the token counts, downsampling and head inference are those of the real
model; the embedder maps its width to the tiny transformer's T5 width.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_files import randomize_ as _randomize_  # noqa: E402
from tiny_files import round_ as _round_  # noqa: E402
from tiny_files import save as _save  # noqa: E402

from make_tiny_models import FILL_FOLDER, SEED, TINY_TRANSFORMER  # noqa: E402

REDUX_FOLDER = "FLUX.1-Redux-dev"
DEV_FOLDER = "FLUX.1-dev"
TINY_SIGLIP = dict(hidden_size=144, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                   image_size=54, patch_size=2, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
DEV_TRANSFORMER = dict(TINY_TRANSFORMER, in_channels=64)


def tiny_siglip(**overrides):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(SEED + 1)
    model = SiglipVisionModel(SiglipVisionConfig(**{**TINY_SIGLIP, **overrides})).eval()
    _round_(model, torch.float16)
    return model


def tiny_processor(size: int = TINY_SIGLIP["image_size"]):
    from editkit.pipelines.flux.redux.loading import _image_processor_class

    return _image_processor_class()(
        do_resize=True, size={"height": size, "width": size}, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )


def redux_embedder(redux_dim: int = TINY_SIGLIP["hidden_size"], width: int = TINY_TRANSFORMER["joint_attention_dim"]):
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    torch.manual_seed(SEED + 2)
    model = ReduxImageEncoder(redux_dim=redux_dim, txt_in_features=width).eval()
    _round_(model, torch.bfloat16)
    return model


def dev_transformer(**overrides):
    """A tiny FLUX.1-dev-shaped transformer (64 input features, guidance embedding)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(SEED + 3)
    model = FluxTransformer2DModel(**{**DEV_TRANSFORMER, **overrides})
    _randomize_(model, torch.Generator().manual_seed(SEED + 3))
    _round_(model, torch.bfloat16)
    return model.eval()


def make_tiny_redux_models(out_dir: str | Path) -> dict[str, Path]:
    from diffusers import FluxPriorReduxPipeline

    from packload import pack_module

    layout = pack_module("pipelines.flux.layout")
    out = Path(out_dir)
    encoder, embedder = tiny_siglip(), redux_embedder()
    folder = out / "diffusers" / REDUX_FOLDER
    FluxPriorReduxPipeline(image_encoder=encoder, feature_extractor=tiny_processor(),
                           image_embedder=embedder).save_pretrained(str(folder))
    # The published files key SigLIP as "vision_model.*" (transformers 4.x); ComfyUI's clip_vision file too.
    siglip_sd = {f"vision_model.{k}" if not k.startswith("vision_model.") else k: v
                 for k, v in encoder.state_dict().items()}
    _save(siglip_sd, folder / "image_encoder" / "model.safetensors")
    paths = {"redux_folder": folder}
    paths["redux_style"] = out / "style_models" / "flux1-redux-dev.safetensors"
    _save(embedder.state_dict(), paths["redux_style"], torch.bfloat16)
    paths["redux_siglip"] = out / "clip_vision" / "sigclip_vision_patch14_384.safetensors"
    _save({k: v for k, v in siglip_sd.items() if not k.startswith("vision_model.head.")},
          paths["redux_siglip"], torch.float16)
    transformer = dev_transformer()
    paths["dev_bfl"] = out / "diffusion_models" / "flux1-dev.safetensors"
    if not paths["dev_bfl"].exists():
        _save(layout.diffusers_transformer_to_bfl(transformer.state_dict()), paths["dev_bfl"], torch.bfloat16)
    dev_folder, fill_folder = out / "diffusers" / DEV_FOLDER, out / "diffusers" / FILL_FOLDER
    if not dev_folder.exists() and fill_folder.is_dir():
        shutil.copytree(fill_folder, dev_folder, ignore=shutil.ignore_patterns("transformer"))
        transformer.save_pretrained(str(dev_folder / "transformer"))
        index = json.loads((dev_folder / "model_index.json").read_text())
        (dev_folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}, indent=2))
        paths["dev_folder"] = dev_folder
    return paths
