"""FLUX.1-dev generation node: text-to-image and image-to-image (thin glue over pipelines.flux.generate)."""

from __future__ import annotations

from ..pipelines.core import sampling as core
from ..pipelines.core.errors import EditKitError
from ..pipelines.core.images import image_to_nchw, nchw_to_image
from ..pipelines.flux import generate as gen
from ..pipelines.flux import vae as vae_ops
from ..pipelines.flux.conditioning import read_conditioning
from . import comfy_bridge as bridge
from .common import (
    batch_input,
    convention_input,
    denoise_input,
    flux_text,
    latent_dict,
    sampler_input,
    seed_input,
    steps_input,
)

CATEGORY = "EditKit/flux"



class EditKitFluxSampler:
    DISPLAY_NAME = "EditKit · Flux Text to Image Sampler"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Generates with FLUX.1-dev, FLUX.1-schnell or any 64-feature Flux transformer from EditKit · Flux Loader: "
        "text-to-image, or image-to-image from an IMAGE or a LATENT with denoise < 1. Guidance-distilled models "
        "use 'guidance'; a 'negative' conditioning turns on true CFG (two model calls per step, off by default). "
        "The LATENT output is ComfyUI's raw VAE space, so native VAEDecode and latent nodes work on it."
    )
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = (
        "The generated pictures.",
        "The generated latents (raw VAE space; VAEDecode of it gives 'image').",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("EDITKIT_FLUX", {"tooltip": "FLUX.1-dev/schnell transformer from EditKit · Flux Loader."}),
                "vae": ("EDITKIT_VAE", {"tooltip": "FLUX.1 VAE from EditKit · Flux Loader."}),
                "conditioning": ("CONDITIONING", {
                    "tooltip": "Prompt from EditKit · Flux Text Encode, native CLIPTextEncode (DualCLIPLoader type "
                               "flux), FluxGuidance, or EditKit · Redux Encode.",
                }),
                "width": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Width of the picture (multiple of 16). Ignored when starting from an "
                                             "image or latent."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Height of the picture (multiple of 16). Ignored when starting from an "
                                              "image or latent."}),
                "seed": seed_input(),
                "steps": steps_input(28),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "FLUX.1 guidance embedding (3.5 for FLUX.1-dev; schnell ignores "
                                                  "it). A 'guidance' set on the CONDITIONING (FluxGuidance) wins."}),
                "sampler": sampler_input(),
                "denoise": denoise_input(),
                "batch_size": batch_input(),
            },
            "optional": {
                "negative": ("CONDITIONING", {
                    "tooltip": "Negative prompt: enables true CFG with 'cfg'. Guidance-distilled FLUX.1-dev does not "
                               "need it; leave unconnected for normal use.",
                }),
                "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "True CFG scale, used only with a negative prompt (1 = off)."}),
                "latent": ("LATENT", {"tooltip": "Start from this latent (image-to-image; set denoise < 1)."}),
                "image": ("IMAGE", {"tooltip": "Start from this picture (image-to-image; set denoise < 1). "
                                               "Width and height must be multiples of 16."}),
                "denoise_convention": convention_input(),
            },
        }

    def sample(self, model, vae, conditioning, width, height, seed, steps, guidance, sampler, denoise, batch_size,
               negative=None, cfg=1.0, latent=None, image=None, denoise_convention="denoise"):
        if latent is not None and image is not None:
            raise EditKitError("Connect either 'latent' or 'image' to start from, not both.")
        core.check_partial(denoise, denoise_convention)
        if sampler not in core.SAMPLERS:
            raise EditKitError(f"Unknown sampler '{sampler}'. EditKit samplers offer: {', '.join(core.SAMPLERS)}.")
        if latent is None and image is None:
            gen.check_size(width, height)  # before loading anything
        runtime = bridge.runtime()
        transformer = model.transformer.get()
        config = transformer.module.config
        text, guidance = flux_text(conditioning, config, guidance)
        neg = None
        if negative is not None:
            neg = read_conditioning(negative, config.joint_attention_dim, config.pooled_projection_dim,
                                    what="negative")
        vae_component = vae.get()
        init = None
        if latent is not None:
            init = vae_ops.raw_to_model(vae_component, vae_ops.read_latent(latent["samples"]))
        elif image is not None:
            pixels = image_to_nchw(image)
            gen.check_size(pixels.shape[-1], pixels.shape[-2])
            init = vae_ops.encode(vae_component, pixels, runtime)
        settings = gen.GenerateSettings(
            steps=steps, guidance=guidance, seed=seed, denoise=denoise, convention=denoise_convention,
            sampler=core.SamplerSettings(sampler), cfg_scale=cfg,
        )
        result = gen.generate(
            transformer, vae_component, text, width=width, height=height, settings=settings,
            scheduler_config=model.scheduler_config, runtime=runtime, negative=neg, init_latents=init,
            per_start=batch_size,
        )
        return nchw_to_image(result.images), latent_dict(vae_ops.model_to_raw(vae_component, result.latents))


NODES = [EditKitFluxSampler]
