"""Real-width transformers with a chosen depth, random weights: the benchmarks' models.

Every layer has its real size (FLUX.1: 24 heads x 128, T5/CLIP widths 4096/768; Qwen-Image: 24 x 128,
Qwen2.5-VL width 3584; Z-Image: 3840 wide, 30 heads, Qwen3 width 2560; FLUX.2 [klein] 4B: 24 x 128,
text width 7680), so the cost of a block is the
real model's; only the number of blocks is cut (FLUX.1 19+38, Qwen-Image 60, Z-Image 30, klein 4B 5+20),
deep enough by default (4+8, 8, 8, 2+8) that a step's matmuls dominate its time. Weights are drawn on the meta
device first and filled once (norms 1, the rest N(0, 0.02)), which is much faster than the modules'
own initialisation at these sizes.
"""

from __future__ import annotations

import torch

SEED = 20261206
FLUX_WIDTHS = dict(patch_size=1, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_IN = {"fill": (384, 64), "dev": (64, None), "kontext_inpaint": (192, 64)}
QWEN_WIDTHS = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
FLUX2_KLEIN_4B_WIDTHS = dict(patch_size=1, in_channels=128, attention_head_dim=128, num_attention_heads=24,
                             joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                             axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)
ZIMAGE_WIDTHS = dict(dim=3840, n_refiner_layers=1, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                     axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])


def _filled(cls, dtype: torch.dtype, device, seed: int = SEED, **config):
    with torch.device("meta"):
        model = cls(**config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            state[name] = torch.zeros(tensor.shape, dtype=tensor.dtype)
        elif "norm" in name and name.endswith("weight") and tensor.ndim == 1:
            state[name] = torch.ones(tensor.shape, dtype=dtype)
        elif "norm" in name and name.endswith("bias") and tensor.ndim == 1:
            state[name] = torch.zeros(tensor.shape, dtype=dtype)
        else:
            state[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(dtype)
    model.load_state_dict(state, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary tables) stay on meta: rebuild
        if buffer.is_meta:
            raise RuntimeError(f"{cls.__name__}: buffer {name} is not in the state dict; build it on the CPU")
    return model.to(device).eval().requires_grad_(False)


def flux_transformer(kind: str = "fill", depth: tuple[int, int] = (4, 8), dtype=torch.float32, device="cpu"):
    """FLUX.1 ``kind`` (fill: 384 input features, dev: 64, kontext_inpaint: 192) at real width."""
    from diffusers import FluxTransformer2DModel

    in_channels, out_channels = FLUX_IN[kind]
    return _filled(FluxTransformer2DModel, dtype, device, in_channels=in_channels, out_channels=out_channels,
                   num_layers=depth[0], num_single_layers=depth[1], **FLUX_WIDTHS)


def qwen_transformer(layers: int = 8, dtype=torch.float32, device="cpu"):
    from diffusers import QwenImageTransformer2DModel

    model = _filled(QwenImageTransformer2DModel, dtype, "cpu", num_layers=layers, **QWEN_WIDTHS)
    # Its rotary tables are plain tensor attributes (neither parameters nor buffers): built on the meta
    # device above, so build the embedder again on the CPU.
    model.pos_embed = type(model.pos_embed)(theta=10000, axes_dim=list(QWEN_WIDTHS["axes_dims_rope"]),
                                            scale_rope=True)
    return model.to(device)


def qwen_transformer_2511(layers: int = 8, dtype=torch.float32, device="cpu"):
    """The same weights as :func:`qwen_transformer` with diffusers' ``zero_cond_t`` on (Qwen-Image-Edit-2511)."""
    from diffusers import QwenImageTransformer2DModel

    base = qwen_transformer(layers, dtype, "cpu")
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(num_layers=layers, zero_cond_t=True, **QWEN_WIDTHS)
    model.load_state_dict(base.state_dict(), assign=True)
    model.pos_embed = base.pos_embed
    return model.eval().requires_grad_(False).to(device)


def flux2_transformer(depth: tuple[int, int] = (2, 8), dtype=torch.float32, device="cpu"):
    """FLUX.2 [klein] 4B at real width (its real depth: 5 double + 20 single blocks)."""
    from diffusers import Flux2Transformer2DModel

    return _filled(Flux2Transformer2DModel, dtype, device, num_layers=depth[0], num_single_layers=depth[1],
                   **FLUX2_KLEIN_4B_WIDTHS)


def zimage_transformer(layers: int = 8, dtype=torch.float32, device="cpu"):
    from diffusers import ZImageTransformer2DModel

    return _filled(ZImageTransformer2DModel, dtype, device, n_layers=layers, **ZIMAGE_WIDTHS)


def flux_vae(dtype=torch.float32, device="cpu", real: bool = True):
    """FLUX.1's VAE (real size, random weights), or the tests' tiny one (``real=False``) where only the
    transformer's steps are timed."""
    from diffusers import AutoencoderKL

    from packload import pack_module
    from tiny.flux1 import TINY_VAE

    if real:
        config = AutoencoderKL.load_config(str(pack_module("pipelines.flux.loading").VAE_CONFIG_DIR))
        torch.manual_seed(SEED)
        vae = AutoencoderKL.from_config(config)
    else:
        torch.manual_seed(SEED)
        vae = AutoencoderKL(**TINY_VAE)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def twin(module: torch.nn.Module) -> torch.nn.Module:
    """A second module object over the same weight tensors (no extra memory): compiling one leaves the
    other eager, so compiled and eager cases can share one model's weights."""
    import copy

    shared = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo=shared)


def component(module, name: str, dtype: torch.dtype, kind: str = "diffusion"):
    from packload import pack_module

    return pack_module("pipelines.core.runtime").Component(module, kind, name, dtype)


def flux_text(config, tokens: int, seed: int = 0, batch: int = 1):
    """Fixed random prompt states of FLUX.1's widths (T5 states + CLIP pooled)."""
    from packload import pack_module

    conditioning = pack_module("pipelines.flux.conditioning")
    g = torch.Generator().manual_seed(seed)
    return conditioning.FluxText(torch.randn(batch, tokens, config.joint_attention_dim, generator=g),
                                 torch.randn(batch, config.pooled_projection_dim, generator=g), None)
