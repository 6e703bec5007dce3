"""fp8 single files for the precision tests: one tiny random transformer per family, written as ComfyUI ships fp8.

Each family's model is built from a tiny diffusers config with random weights and written as ``float8_e4m3fn``,
``float8_e5m2`` and ComfyUI's scaled ``float8_e4m3fn`` (``scale_weight`` per layer, ``scaled_fp8`` marker),
every 2-D ``.weight`` in fp8 (Linear and Embedding weights alike, as ComfyUI's converters do) and the rest bf16;
FLUX.1 in BFL's key layout (so the scales must follow the fused ``qkv``/``linear1`` splits), the others with
ComfyUI's ``model.diffusion_model.`` prefix. Next to each, a float32 "reference" file holds the same numbers
cast up front (fp8 times its scale): what the old loaders held in memory. Separate from the tiny-model
generators because these files exist only to compare the two storages.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

FP8 = {"e4m3fn": (torch.float8_e4m3fn, False), "e5m2": (torch.float8_e5m2, False),
       "scaled": (torch.float8_e4m3fn, True)}
SCALE = 2.0 ** -6  # a power of two: fp8 x scale is exact in float32, so the reference holds the same numbers
COMFY_PREFIX = "model.diffusion_model."

FLUX = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
QWEN = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128, num_attention_heads=1,
            joint_attention_dim=32, axes_dims_rope=(16, 56, 56))
LAYERED = dict(QWEN, use_additional_t_cond=True, use_layer3d_rope=True)
ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=128, n_layers=1, n_refiner_layers=1,
              n_heads=1, n_kv_heads=1, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
              axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
FLUX2 = dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
             num_attention_heads=1, joint_attention_dim=48, timestep_guidance_channels=256, mlp_ratio=3.0,
             axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)


def _random_model(cls, config: dict, seed: int) -> torch.nn.Module:
    model = cls(**config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.05)
    return model


def tiny_model(family: str, depth: int = 1) -> torch.nn.Module:
    """``family``'s tiny transformer with ``depth`` blocks of each kind."""
    import diffusers

    cls, config = {"flux": ("FluxTransformer2DModel", FLUX), "fill": ("FluxTransformer2DModel", dict(FLUX, in_channels=384, out_channels=64)),
                   "qwen": ("QwenImageTransformer2DModel", QWEN), "layered": ("QwenImageTransformer2DModel", LAYERED),
                   "flux2": ("Flux2Transformer2DModel", FLUX2), "zimage": ("ZImageTransformer2DModel", ZIMAGE)}[family]
    if family == "zimage":
        config = dict(config, n_layers=depth)
    else:
        config = dict(config, num_layers=depth, **({"num_single_layers": depth} if "num_single_layers" in config else {}))
    return _random_model(getattr(diffusers, cls), config, seed=len(family))


def _as_file(family: str, sd: dict) -> dict:
    if family in ("flux", "fill"):
        from editkit.pipelines.flux.layout import diffusers_transformer_to_bfl

        return diffusers_transformer_to_bfl(sd, prefix=COMFY_PREFIX)
    return {COMFY_PREFIX + k: v for k, v in sd.items()}


def write_fp8_files(family: str, out: Path, depth: int = 1) -> dict[str, tuple[Path, Path]]:
    """``{variant: (fp8 file, float32 reference file)}`` for ``family``'s tiny transformer."""
    out.mkdir(parents=True, exist_ok=True)
    sd = _as_file(family, {k: v.contiguous() for k, v in tiny_model(family, depth).state_dict().items()})
    return write_fp8_variants(sd, out, family)


def write_fp8_variants(sd: dict, out: Path, stem: str) -> dict[str, tuple[Path, Path]]:
    """``sd``'s 2-D weights as e4m3fn, e5m2 and ComfyUI's scaled e4m3fn files (the rest bf16), each with a float32
    reference holding the same numbers cast up front (what the old loaders held in memory)."""
    paths = {}
    for variant, (fp8, scaled) in FP8.items():
        file, reference = {}, {}
        for key, tensor in sd.items():
            if tensor.ndim == 2 and key.endswith(".weight"):
                scale = SCALE if scaled else 1.0
                stored = (tensor.float() / scale).to(fp8)
                file[key] = stored
                reference[key] = stored.float() * scale
                if scaled:
                    file[key[: -len(".weight")] + ".scale_weight"] = torch.tensor(scale)
            else:
                file[key] = tensor.to(torch.bfloat16)
                reference[key] = file[key].float()
        if scaled:
            file["scaled_fp8"] = torch.zeros(0, dtype=fp8)
        pair = out / f"{stem}_{variant}.safetensors", out / f"{stem}_{variant}_reference.safetensors"
        safetensors.torch.save_file(file, str(pair[0]))
        safetensors.torch.save_file(reference, str(pair[1]))
        paths[variant] = pair
    return paths


def forward(family: str, module: torch.nn.Module) -> torch.Tensor:
    """One call of the family's transformer on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    c = module.config
    with torch.inference_mode():
        if family in ("flux", "fill"):
            from editkit.pipelines.flux.flow import text_ids, token_ids

            return module(hidden_states=torch.randn(1, 16, c.in_channels, generator=g), timestep=torch.tensor([0.6]),
                          guidance=torch.tensor([30.0]),
                          pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                          encoder_hidden_states=torch.randn(1, 7, c.joint_attention_dim, generator=g),
                          txt_ids=text_ids(7), img_ids=token_ids(8, 8), return_dict=False)[0]
        if family in ("qwen", "layered"):
            extra = {"additional_t_cond": torch.zeros(1, dtype=torch.long)} if family == "layered" else {}
            shapes = [(1, 4, 4), (1, 4, 4)]
            return module(hidden_states=torch.randn(1, 32, c.in_channels, generator=g), timestep=torch.tensor([0.5]),
                          encoder_hidden_states=torch.randn(1, 7, c.joint_attention_dim, generator=g),
                          encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long), img_shapes=[shapes],
                          return_dict=False, **extra)[0]
        if family == "zimage":
            out = module([torch.randn(c.in_channels, 1, 8, 8, generator=g)], torch.tensor([0.5]),
                         [torch.randn(7, c.cap_feat_dim, generator=g)], return_dict=False)[0]
            return torch.stack(out)
        img = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1),
                                         indexing="ij"), dim=-1).reshape(-1, 4)
        txt = torch.stack([torch.zeros(7), torch.zeros(7), torch.zeros(7), torch.arange(7.0)], dim=-1)
        return module(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
                      encoder_hidden_states=torch.randn(1, 7, c.joint_attention_dim, generator=g),
                      timestep=torch.tensor([0.5]), img_ids=img, txt_ids=txt, guidance=None, return_dict=False)[0]


def source(family: str):
    """The family's ``transformer_source`` (folder, file, compute dtype)."""
    from editkit.pipelines.flux import loading as flux_loading
    from editkit.pipelines.flux2 import loading as flux2_loading
    from editkit.pipelines.qwen_image import layered_loading
    from editkit.pipelines.qwen_image import loading as qwen_loading
    from editkit.pipelines.zimage import loading as zimage_loading

    return {"zimage": zimage_loading.transformer_source,"flux": flux_loading.transformer_source, "fill": flux_loading.transformer_source,
            "qwen": qwen_loading.transformer_source, "layered": layered_loading.transformer_source,
            "flux2": flux2_loading.transformer_source}[family]


class LiveBytes(TorchDispatchMode):
    """The most bytes of CPU tensor storage alive at any moment while active: the file's tensors (:meth:`adopt`:
    safetensors does not make them with torch ops) and every new storage a torch op returns (not a view of an
    input), each followed with a weak reference until it is freed."""

    def __init__(self):
        super().__init__()
        self.peak = 0
        self._live: list[tuple[int, int]] = []

    def adopt(self, tensors: dict) -> dict:
        """Count ``tensors`` (the file's, as read) as live from now until they are freed."""
        seen = {}
        for tensor in tensors.values():
            storage = tensor.untyped_storage()
            seen.setdefault(storage.data_ptr(), storage)
        self._add(list(seen.values()))
        return tensors

    def _add(self, storages: list) -> None:  # the weak references' control blocks are left (a few hundred bytes)
        self._live = [entry for entry in self._live if not torch.UntypedStorage._expired(entry[0])]
        self._live += [(storage._weak_ref(), storage.nbytes()) for storage in storages]
        self.peak = max(self.peak, sum(size for _handle, size in self._live))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {}))
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        fresh = [t.untyped_storage() for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                 and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in inputs]
        if fresh:
            self._add(fresh)
        return out
