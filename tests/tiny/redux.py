"""FLUX.1 Redux: the prior's diffusers folder, the embedder (style_models) and SigLIP (clip_vision) files.

The tiny SigLIP keeps so400m's 72-wide attention heads (2 of them) and a 27x27 token grid (patch 2 on 54 px), so the
token counts, downsampling and head inference are those of the real model; the embedder maps its width to the tiny
FLUX.1 transformer's T5 width.
"""

from __future__ import annotations

from . import flux1
from .core import BF16, FP16, Family, File, Folder, Part, safetensors

SEED = flux1.SEED
TINY_SIGLIP = dict(hidden_size=144, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=54,
                   patch_size=2, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def tiny_processor(size: int = TINY_SIGLIP["image_size"]):
    from editkit.pipelines.flux.redux.loading import _image_processor_class

    return _image_processor_class()(
        do_resize=True, size={"height": size, "width": size}, resample=3, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )


def siglip_keys(sd):  # the published files (and ComfyUI's clip_vision file) key SigLIP as "vision_model.*"
    return {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in sd.items()}


FAMILY = Family(
    "redux", None,
    parts={
        "image_encoder": Part("SiglipVisionModel", TINY_SIGLIP, seed=SEED + 1, precision=FP16),
        "image_embedder": Part("ReduxImageEncoder", dict(redux_dim=TINY_SIGLIP["hidden_size"],
                               txt_in_features=flux1.TINY_TRANSFORMER["joint_attention_dim"]), seed=SEED + 2),
    },
    extras=lambda _: dict(feature_extractor=tiny_processor()),
    folders=(Folder("FLUX.1-Redux-dev", "FluxPriorReduxPipeline", "redux_folder"),),
    files={  # the folder's SigLIP as published (transformers 5 saves it without the prefix)
        "redux_folder_encoder": File("diffusers/FLUX.1-Redux-dev/image_encoder/model.safetensors", "image_encoder",
                                     siglip_keys, safetensors(None)),
        "redux_style": File("style_models/flux1-redux-dev.safetensors", "image_embedder", write=safetensors(BF16)),
        "redux_siglip": File("clip_vision/sigclip_vision_patch14_384.safetensors", "image_encoder", lambda sd: {
            k: v for k, v in siglip_keys(sd).items() if not k.startswith("vision_model.head.")}, safetensors(FP16)),
    },
)
