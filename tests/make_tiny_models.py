"""Write tiny random-weight models, in the real file formats, as a ComfyUI-style models tree.

    python tests/make_tiny_models.py OUT_DIR

OUT_DIR then looks like ComfyUI's ``models/`` folder, with the file names the bundled
workflows use, so the workflows run unchanged on it (the pictures are noise: random weights):

    diffusers/FLUX.1-Fill-dev/             full diffusers folder (all components, tiny tokenizers)
    diffusion_models/flux1-fill-dev.safetensors        BFL layout, bf16 (as released)
    diffusion_models/flux1-fill-dev-Q8_0.gguf          GGUF Q8_0, BFL keys (as city96's files)
    diffusion_models/flux1-kontext-inpaint.safetensors 192-feature Kontext-inpaint, BFL layout
    diffusion_models/flux1-dev.safetensors, flux1-dev-Q8_0.gguf   64-feature FLUX.1-dev, BFL layout
    vae/ae.safetensors                                  BFL layout
    text_encoders/clip_l.safetensors, t5xxl_fp16.safetensors
    background_removal/BEN2_Base.safetensors, BEN2_Base.pth   tiny BEN2 (flat safetensors; .pth training dict)

Weights are rounded to the precision of their on-disk copies before anything is written, so
every loading path sees the same numbers (GGUF differs by its Q8_0 rounding only). The
widths are tiny but keep FLUX.1's structure: one 128-wide attention head (FLUX.1's head
width, so the shipped RoPE config applies), a 4-level VAE (scale factor 8, so
Fill keeps its 384 input features), and CLIP/T5 vocabularies of the real size, so the tiny
encoders also work with ComfyUI's bundled tokenizers.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_files  # noqa: E402
from tiny_files import randomize_ as _randomize_  # noqa: E402
from tiny_files import round_ as _round_  # noqa: E402
from tiny_files import save as _save  # noqa: E402
from tiny_files import write_gguf  # noqa: E402,F401  (imported from here by tests)

from packload import offline, pack_module  # noqa: E402

FILL_FOLDER = "FLUX.1-Fill-dev"
SEED = 20261125

TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=1,
    attention_head_dim=128, num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=64,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32], layers_per_block=1,
    latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)
CLIP_VOCAB = 49408
T5_VOCAB = 32128


SHALLOW_TRANSFORMER = dict(TINY_TRANSFORMER, num_attention_heads=24, joint_attention_dim=4096,
                           pooled_projection_dim=768)


def shallow_fill_transformer(dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """FLUX.1-Fill at real width (24 heads x 128, T5/CLIP widths 4096/768) with 1 double + 1 single block.

    Every layer has its real size, so per-layer cost and memory scale like FLUX.1-Fill-dev's
    (which has 19 + 38 blocks); the benchmarks use it where the full model does not fit.
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(SEED)
    with torch.device(device):
        model = FluxTransformer2DModel(**SHALLOW_TRANSFORMER)
    return model.to(dtype).eval().requires_grad_(False)


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codes]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77,
    )


def tiny_t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.printable if not c.isspace()]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def tiny_fill_pipeline():
    """A FluxFillPipeline whose every component is tiny and random (seeded)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
    _randomize_(transformer, generator)
    _round_(transformer, torch.bfloat16)
    vae = AutoencoderKL(**TINY_VAE)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
        projection_dim=64,
    ))
    _round_(clip, torch.float16)
    t5 = T5EncoderModel(T5Config(
        vocab_size=T5_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
        is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
    ))
    _round_(t5, torch.float16)
    loading = pack_module("pipelines.flux.loading")
    scheduler_config = json.loads((loading.CONFIG_DIR / "flux_scheduler" / "scheduler_config.json").read_text())
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    return FluxFillPipeline(
        scheduler=scheduler, vae=vae.eval(), text_encoder=clip.eval(), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=t5.eval(), tokenizer_2=tiny_t5_tokenizer(), transformer=transformer.eval(),
    )


def tiny_dev_transformer():
    """A 64-feature FLUX.1-dev transformer of the tiny Fill's shape (its own seeded weights)."""
    from diffusers import FluxTransformer2DModel

    generator = torch.Generator().manual_seed(SEED + 1)
    torch.manual_seed(SEED + 1)
    transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "in_channels": 64, "out_channels": None})
    _randomize_(transformer, generator)
    _round_(transformer, torch.bfloat16)
    return transformer.eval()


def make_tiny_models(out_dir: str | Path) -> dict[str, Path]:
    """Write the whole tree into ``out_dir`` and return the main paths by role."""
    offline()
    layout = pack_module("pipelines.flux.layout")
    out = Path(out_dir)
    paths: dict[str, Path] = {}

    pipe = tiny_fill_pipeline()
    folder = out / "diffusers" / FILL_FOLDER
    pipe.save_pretrained(str(folder))
    paths["fill_folder"] = folder

    transformer_sd = pipe.transformer.state_dict()
    bfl = layout.diffusers_transformer_to_bfl(transformer_sd)
    paths["fill_bfl"] = out / "diffusion_models" / "flux1-fill-dev.safetensors"
    _save(bfl, paths["fill_bfl"], torch.bfloat16)
    paths["fill_gguf"] = out / "diffusion_models" / "flux1-fill-dev-Q8_0.gguf"
    write_gguf(bfl, paths["fill_gguf"])

    paths["vae"] = out / "vae" / "ae.safetensors"
    _save(layout.diffusers_vae_to_bfl(pipe.vae.state_dict()), paths["vae"])
    paths["clip_l"] = out / "text_encoders" / "clip_l.safetensors"
    clip_sd = {k if k.startswith("text_model.") else f"text_model.{k}": v  # ComfyUI's clip_l key layout
               for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    _save(clip_sd, paths["clip_l"], torch.float16)
    paths["t5"] = out / "text_encoders" / "t5xxl_fp16.safetensors"
    t5_sd = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    _save(t5_sd, paths["t5"], torch.float16)

    dev_bfl = layout.diffusers_transformer_to_bfl(tiny_dev_transformer().state_dict())
    paths["dev_bfl"] = out / "diffusion_models" / "flux1-dev.safetensors"
    _save(dev_bfl, paths["dev_bfl"], torch.bfloat16)
    paths["dev_gguf"] = out / "diffusion_models" / "flux1-dev-Q8_0.gguf"
    write_gguf(dev_bfl, paths["dev_gguf"])

    # A "trained" Kontext-inpaint transformer: Fill widened with non-zero mask-image columns.
    kontext = pack_module("pipelines.flux.kontext_inpaint").widen_fill_transformer(
        pipe.transformer, init="small_random", std=0.05, seed=SEED
    )
    _round_(kontext, torch.bfloat16)
    paths["kontext_bfl"] = out / "diffusion_models" / "flux1-kontext-inpaint.safetensors"
    _save(layout.diffusers_transformer_to_bfl(kontext.state_dict()), paths["kontext_bfl"], torch.bfloat16)

    # BEN2 Base, tiny configuration of the same network, in both published formats.
    ben2 = pack_module("pipelines.ben2")
    torch.manual_seed(SEED)
    network = ben2.BEN2Base(ben2.BEN2Config.tiny())
    for suffix in ("safetensors", "pth"):
        paths[f"ben2_{suffix}"] = ben2.save_ben2_checkpoint(network, out / "background_removal" / f"BEN2_Base.{suffix}")

    from tiny_redux_models import make_tiny_redux_models  # FLUX.1 Redux prior + FLUX.1-dev transformer

    paths.update(make_tiny_redux_models(out))

    from zimage_models import make_zimage_models  # Z-Image-Turbo: folder, ComfyUI files, GGUF, Qwen3

    paths.update(make_zimage_models(out))

    from qwen_image_models import make_qwen_image_models  # Qwen-Image-Edit-2509: folder, ComfyUI files, GGUF

    paths.update({f"qwen_{role}": path for role, path in make_qwen_image_models(out).items()})
    from flux2_models import make_flux2_models  # FLUX.2 [klein]: folder, BFL file, GGUF, VAE and Qwen3 files

    paths.update(make_flux2_models(out))
    from qwen_layered_models import make_qwen_layered_models  # Qwen-Image-Layered: the diffusers folder

    paths.update({f"qwen_layered_{role}": path for role, path in make_qwen_layered_models(out, single_files=False).items()})
    return paths


def main(argv=None) -> int:
    return tiny_files.main(make_tiny_models, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
