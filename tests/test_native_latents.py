"""Native ComfyUI nodes on the LATENT of every EditKit sampler, in ComfyUI's real executor (COMFYUI_ROOT needed).

Each family's graph runs as a user would build it, with nothing reshaped in between: the sampler's LATENT goes to
native VAEDecode (ComfyUI's own VAE for the family, from a native VAELoader), LatentUpscaleBy and SaveLatent; a
second run reads the saved file with LoadLatent; native VAEEncode feeds the EditKit samplers that take a latent.

ComfyUI 0.3.64's VAELoader recognises a VAE by its keys and always builds the real architecture (the FLUX.1 VAE
with 128 base channels, the Wan-2.1 VAE with 96), so the tiny VAEs cannot be loaded natively: the tests use
random VAEs of the real width in ComfyUI's key layouts (``flux_vae_full_width.safetensors``, written with the
Z-Image models, and ``qwen_image_vae_full_width.safetensors``, written here), and EditKit's loaders load the same
files. Both sides then compute in fp32 with the same weights; native and EditKit decodes of one latent agree to
``DECODE_TOLERANCE`` (measured: at most 1.5e-6 for the Wan VAE, 4.6e-6 for the FLUX.1 VAE, also between two
native decodes of one latent), far below one 8-bit level.
Pictures are 32x32 and samplers run 1-2 steps to keep the real-width VAEs quick.
"""

from __future__ import annotations

import pytest
import torch

from tiny import qwen_image as qm
from tiny import zimage as zm
from tiny.core import save

pytestmark = pytest.mark.comfyui

DECODE_TOLERANCE = 1e-4  # pixels in 0..1; one 8-bit level is 3.9e-3
FLUX_VAE = zm.NATIVE_VAE
QWEN_VAE = qm.FILES["native_vae"]
SIZE = 32


@pytest.fixture(scope="module")
def native(comfyui, tiny_models):
    """The executor, with the real-width Qwen-Image VAE written into the tiny models tree."""
    path = tiny_models / "vae" / QWEN_VAE
    if not path.is_file():
        save(qm.full_width_vae_wan(), path)
    comfyui.folder_paths.filename_list_cache.pop("vae", None)
    return comfyui


def _run(comfyui, graph: dict):
    run = comfyui.run(graph)
    assert run.success, run.error()
    return run


def _picture(graph: dict, node: str = "img", name: str = "editkit_portrait.png", size: int = SIZE) -> list:
    graph[f"{node}_load"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    graph[node] = {"class_type": "ImageScale", "inputs": {"image": [f"{node}_load", 0], "upscale_method": "area",
                                                          "width": size, "height": size, "crop": "center"}}
    return [node, 0]


def _native_tail(graph: dict, latent: list, vae: str, prefix: str, tag: str) -> None:
    """VAEDecode (+ preview, so it runs), LatentUpscaleBy and SaveLatent on ``latent``."""
    graph[f"{tag}_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
    graph[f"{tag}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": [f"{tag}_vae", 0]}}
    graph[f"{tag}_preview"] = {"class_type": "PreviewImage", "inputs": {"images": [f"{tag}_decode", 0]}}
    graph[f"{tag}_save"] = {"class_type": "SaveLatent", "inputs": {"samples": latent, "filename_prefix": prefix}}


def _preview(graph: dict, image: list, tag: str) -> None:
    graph[f"{tag}_preview"] = {"class_type": "PreviewImage", "inputs": {"images": image}}


def _saved(run, tag: str) -> str:
    """LoadLatent's name for the file SaveLatent wrote (ComfyUI's ``[output]`` annotation)."""
    (entry,) = run.ui[f"{tag}_save"]["latents"]
    return f"{entry['subfolder']}/{entry['filename']} [output]" if entry["subfolder"] else f"{entry['filename']} [output]"


def _load_and_decode(comfyui, saved: dict[str, str], vae: str) -> dict[str, torch.Tensor]:
    """Second run: LoadLatent each saved file and decode it natively; returns (latent, picture) per tag."""
    graph = {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}}}
    for tag, name in saved.items():
        graph[f"{tag}_load"] = {"class_type": "LoadLatent", "inputs": {"latent": name}}
        graph[f"{tag}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{tag}_load", 0],
                                                                        "vae": ["vae", 0]}}
        _preview(graph, [f"{tag}_decode", 0], tag)
    run = _run(comfyui, graph)
    return {tag: (run.output(f"{tag}_load", 0)["samples"], run.output(f"{tag}_decode", 0)) for tag in saved}


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float = DECODE_TOLERANCE) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    error = (a.float() - b.float()).abs().max().item()
    assert error < tolerance, error


def _differs(a: torch.Tensor, b: torch.Tensor) -> None:
    """The pictures compared are not all the same (so agreeing within the tolerance means something)."""
    assert (a.float() - b.float()).abs().mean().item() > 100 * DECODE_TOLERANCE


# --------------------------------------------------------------------------------------------------------------
# Qwen-Image: 5-D Wan-2.1 latents


def _qwen_edit(graph: dict, tag: str, image: list, **inputs) -> list:
    settings = {"prompt": "make it red", "negative_prompt": " ", "true_cfg_scale": 1.0, "steps": 2, "seed": 3,
                "denoise": 1.0, "sampler": "euler", "batch_size": 1, "output_size": "explicit", "width": SIZE,
                "height": SIZE, "max_megapixels": 1.0, "reference_size": "no shift", "custom_vl_size": 384,
                "custom_vae_size": 1024}
    settings.update(inputs)
    graph[tag] = {"class_type": "EditKitQwenImageEdit", "inputs": {
        "model": ["qwen", 0], "text_encoder": ["qwen", 1], "vae": ["qwen", 2], "image": image, **settings}}
    _preview(graph, [tag, 0], tag)
    return [tag, 1]


def _qwen_graph() -> dict:
    return {"qwen": {"class_type": "EditKitQwenImageLoader", "inputs": {
        "diffusers_folder": qm.FOLDER, "transformer_file": "(from folder)", "text_encoder_file": "(from folder)",
        "vae_file": QWEN_VAE, "variant": "auto", "weight_dtype": "fp32"}}}


def test_qwen_image_edit_latent_works_in_native_nodes(native):
    """Fault 4: the edit's LATENT is 5-D [B,16,1,h,w], so ComfyUI's Qwen-Image VAE decodes it as it is."""
    graph = _qwen_graph()
    image = _picture(graph)
    latent = _qwen_edit(graph, "edit", image)
    _native_tail(graph, latent, QWEN_VAE, "editkit_native/qwen", "native")
    graph["up"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": latent, "upscale_method": "nearest-exact",
                                                               "scale_by": 1.5}}
    _qwen_edit(graph, "from_upscaled", image, latent=["up", 0], denoise=0.5)
    graph["encoded"] = {"class_type": "VAEEncode", "inputs": {"pixels": image, "vae": ["native_vae", 0]}}
    _qwen_edit(graph, "from_encoded", image, latent=["encoded", 0], denoise=0.5)
    _qwen_edit(graph, "from_image", image, denoise=0.5)
    run = _run(native, graph)

    samples = run.output("edit", 1)["samples"]
    assert samples.shape == (1, 16, 1, SIZE // 8, SIZE // 8)
    decoded = run.output("native_decode", 0)
    _close(decoded, run.output("edit", 0))  # native VAEDecode == the edit's own picture
    _differs(decoded, run.output("from_image", 0))
    assert run.output("up", 0)["samples"].shape == (1, 16, 1, 6, 6)
    assert run.output("from_upscaled", 1)["samples"].shape == (1, 16, 1, 6, 6)
    assert run.output("from_upscaled", 0).shape == (1, 48, 48, 3)
    # Native VAEEncode of picture 1 is the start EditKit encodes itself: the same edit.
    assert run.output("encoded", 0)["samples"].shape == (1, 16, 1, SIZE // 8, SIZE // 8)
    _close(run.output("from_encoded", 0), run.output("from_image", 0))

    (loaded, picture), = _load_and_decode(native, {"qwen": _saved(run, "native")}, QWEN_VAE).values()
    assert torch.equal(loaded, samples)
    _close(picture, decoded)


def test_qwen_image_layered_outputs_work_in_native_nodes(native):
    """Layered gives RGBA layers and their alpha (no LATENT: its RGBA VAE has no native counterpart); native
    VAEEncode with the Qwen-Image VAE reads a layer (alpha dropped) into a LATENT the edit starts from."""
    graph = _qwen_graph()
    graph["layered_loader"] = {"class_type": "EditKitQwenImageLayeredLoader", "inputs": {
        "diffusers_folder": "Qwen-Image-Layered", "transformer_file": "(from folder)",
        "text_encoder_file": "(from folder)", "vae_file": "(from folder)", "weight_dtype": "fp32"}}
    image = _picture(graph)
    graph["layered"] = {"class_type": "EditKitQwenImageLayered", "inputs": {
        "model": ["layered_loader", 0], "text_encoder": ["layered_loader", 1], "vae": ["layered_loader", 2],
        "image": image, "layers": 2, "prompt": "a portrait", "steps": 2, "true_cfg_scale": 1.0, "resolution": 32,
        "seed": 1}}
    graph["layer"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["layered", 0], "batch_index": 1,
                                                                 "length": 1}}
    graph["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": QWEN_VAE}}
    graph["encoded"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["layer", 0], "vae": ["vae", 0]}}
    _qwen_edit(graph, "edit", image, latent=["encoded", 0], denoise=0.5)
    graph["alpha"] = {"class_type": "MaskToImage", "inputs": {"mask": ["layered", 1]}}
    _preview(graph, ["alpha", 0], "alpha")
    run = _run(native, graph)
    layers = run.output("layered", 0)
    assert layers.shape == (2, SIZE, SIZE, 4)
    assert torch.equal(run.output("alpha", 0)[..., 0], layers[..., 3])
    assert run.output("encoded", 0)["samples"].shape == (1, 16, 1, SIZE // 8, SIZE // 8)
    assert run.output("edit", 1)["samples"].shape == (1, 16, 1, SIZE // 8, SIZE // 8)


# --------------------------------------------------------------------------------------------------------------
# FLUX.1 family: 4-D latents of the FLUX.1 VAE


def _flux_loader(graph: dict, tag: str, cls: str = "EditKitFluxLoader", transformer: str = "(from folder)",
                 **extra) -> None:
    graph[tag] = {"class_type": cls, "inputs": {
        "diffusers_folder": "FLUX.1-Fill-dev", "transformer_file": transformer, "vae_file": FLUX_VAE,
        "clip_l_file": "(from folder)", "t5_file": "(from folder)", "weight_dtype": "fp32", **extra}}
    graph[f"{tag}_text"] = {"class_type": "EditKitFluxTextEncode", "inputs": {
        "text_encoders": [tag, 1], "prompt": "a bowl of fruit", "max_sequence_length": 64}}


def _editkit_flux_decode(native, run, loader: str, latent: torch.Tensor) -> torch.Tensor:
    """EditKit's own decode of a raw FLUX.1 latent with the loader's VAE (the same weights as ComfyUI's)."""
    runtime = native.pack_submodule("pipelines.core.runtime").TorchRuntime("cpu")
    vae_ops = native.pack_submodule("pipelines.flux.vae")
    images = native.pack_submodule("pipelines.core.images")
    component = run.output(loader, 2).get()
    pixels = vae_ops.decode(component, vae_ops.raw_to_model(component, latent), runtime)
    return images.nchw_to_image(pixels.float().cpu())


def test_flux_fill_latents_work_in_native_nodes(native):
    graph = {}
    _flux_loader(graph, "fill")
    image = _picture(graph)
    graph["mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE, "height": SIZE}}
    sampler = {"model": ["fill", 0], "vae": ["fill", 2], "conditioning": ["fill_text", 0], "image": image,
               "seed": 1, "steps": 2, "guidance": 30.0, "denoise": 1.0, "batch_size": 1}
    graph["inpaint"] = {"class_type": "EditKitFluxFillInpaint", "inputs": {**sampler, "mask": ["mask", 0]}}
    graph["outpaint"] = {"class_type": "EditKitFluxFillOutpaint", "inputs": {
        **sampler, "left": 16, "top": 0, "right": 0, "bottom": 8, "feathering": 4}}
    _native_tail(graph, ["inpaint", 1], FLUX_VAE, "editkit_native/fill", "inpaint_native")
    graph["up"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["outpaint", 1],
                                                               "upscale_method": "nearest-exact", "scale_by": 1.5}}
    graph["outpaint_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["outpaint", 1],
                                                                      "vae": ["inpaint_native_vae", 0]}}
    _preview(graph, ["outpaint_decode", 0], "outpaint_decoded")
    graph["up_save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["up", 0],
                                                               "filename_prefix": "editkit_native/fill_up"}}
    run = _run(native, graph)

    for tag, decoded, shape in (("inpaint", "inpaint_native_decode", (1, 16, 4, 4)),
                                ("outpaint", "outpaint_decode", (1, 16, 5, 6))):
        latent = run.output(tag, 1)["samples"]
        assert latent.shape == shape
        _close(run.output(decoded, 0), _editkit_flux_decode(native, run, "fill", latent))
    _differs(run.output("inpaint_native_decode", 0),
             _editkit_flux_decode(native, run, "fill", run.output("inpaint", 1)["samples"].flip(-1)))
    assert run.output("up", 0)["samples"].shape == (1, 16, 8, 9)
    (loaded, picture), = _load_and_decode(native, {"fill": _saved(run, "inpaint_native")}, FLUX_VAE).values()
    assert torch.equal(loaded, run.output("inpaint", 1)["samples"])
    _close(picture, run.output("inpaint_native_decode", 0))


def test_flux_sampler_and_kontext_latents_work_in_native_nodes(native):
    graph = {}
    _flux_loader(graph, "dev", transformer="flux1-dev.safetensors")
    _flux_loader(graph, "kontext", cls="EditKitKontextInpaintLoader", transformer="flux1-kontext-inpaint.safetensors",
                 widen_init="zeros")
    image = _picture(graph)
    graph["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": FLUX_VAE}}
    graph["encoded"] = {"class_type": "VAEEncode", "inputs": {"pixels": image, "vae": ["vae", 0]}}
    flux = {"model": ["dev", 0], "vae": ["dev", 2], "conditioning": ["dev_text", 0], "width": SIZE, "height": SIZE,
            "seed": 2, "steps": 2, "guidance": 3.5, "sampler": "euler", "denoise": 0.5, "batch_size": 1}
    graph["t2i"] = {"class_type": "EditKitFluxSampler", "inputs": {**flux, "denoise": 1.0}}
    graph["from_encoded"] = {"class_type": "EditKitFluxSampler", "inputs": {**flux, "latent": ["encoded", 0]}}
    graph["from_image"] = {"class_type": "EditKitFluxSampler", "inputs": {**flux, "image": image}}
    graph["up"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["t2i", 1], "upscale_method": "bilinear",
                                                               "scale_by": 1.5}}
    graph["from_upscaled"] = {"class_type": "EditKitFluxSampler", "inputs": {**flux, "latent": ["up", 0]}}
    kontext = {"model": ["kontext", 0], "vae": ["kontext", 2], "conditioning": ["kontext_text", 0], "seed": 4,
               "steps": 2, "guidance": 30.0, "denoise": 0.5, "batch_size": 1}
    graph["kontext_latent"] = {"class_type": "EditKitKontextInpaintEdit", "inputs": {
        **kontext, "source_latent": ["encoded", 0]}}
    graph["kontext_image"] = {"class_type": "EditKitKontextInpaintEdit", "inputs": {**kontext, "image": image}}
    for tag in ("t2i", "from_encoded", "from_image", "from_upscaled", "kontext_latent", "kontext_image"):
        _preview(graph, [tag, 0], tag)
    _native_tail(graph, ["t2i", 1], FLUX_VAE, "editkit_native/flux", "t2i_native")
    graph["kontext_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["kontext_latent", 1],
                                                                     "vae": ["vae", 0]}}
    _preview(graph, ["kontext_decode", 0], "kontext_decoded")
    graph["kontext_save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["kontext_latent", 1],
                                                                    "filename_prefix": "editkit_native/kontext"}}
    run = _run(native, graph)

    _close(run.output("t2i_native_decode", 0), run.output("t2i", 0))  # native VAEDecode == the sampler's picture
    _close(run.output("kontext_decode", 0), run.output("kontext_latent", 0))
    _differs(run.output("t2i", 0), run.output("kontext_latent", 0))
    # Native VAEEncode gives what EditKit's own encode gives: the same img2img and the same Kontext edit.
    _close(run.output("from_encoded", 0), run.output("from_image", 0))
    _close(run.output("kontext_latent", 0), run.output("kontext_image", 0))
    assert run.output("up", 0)["samples"].shape == (1, 16, 6, 6)
    assert run.output("from_upscaled", 0).shape == (1, 48, 48, 3)
    loaded = _load_and_decode(native, {"t2i": _saved(run, "t2i_native"), "kontext": _saved(run, "kontext")},
                              FLUX_VAE)
    assert torch.equal(loaded["t2i"][0], run.output("t2i", 1)["samples"])
    _close(loaded["t2i"][1], run.output("t2i_native_decode", 0))
    assert torch.equal(loaded["kontext"][0], run.output("kontext_latent", 1)["samples"])
    _close(loaded["kontext"][1], run.output("kontext_decode", 0))


# --------------------------------------------------------------------------------------------------------------
# Z-Image: 4-D latents of the FLUX.1 VAE


def test_zimage_latents_work_in_native_nodes(native):
    graph = {"z": {"class_type": "EditKitZImageLoader", "inputs": {
        "diffusers_folder": zm.FOLDER, "transformer_file": "(from folder)", "text_encoder_file": "(from folder)",
        "vae_file": FLUX_VAE, "weight_dtype": "fp32"}}}
    graph["text"] = {"class_type": "EditKitZImageTextEncode", "inputs": {"text_encoder": ["z", 1],
                                                                          "prompt": "a red apple",
                                                                          "negative_prompt": ""}}
    image = _picture(graph)
    sampler = {"model": ["z", 0], "vae": ["z", 2], "positive": ["text", 0], "negative": ["text", 1], "width": SIZE,
               "height": SIZE, "seed": 5, "steps": 2, "cfg": 1.0, "sampler": "euler", "shift": 3.0, "denoise": 1.0,
               "denoise_convention": "denoise", "batch_size": 1, "decode": True}
    graph["t2i"] = {"class_type": "EditKitZImageSampler", "inputs": sampler}
    graph["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": FLUX_VAE}}
    graph["encoded"] = {"class_type": "VAEEncode", "inputs": {"pixels": image, "vae": ["vae", 0]}}
    graph["from_encoded"] = {"class_type": "EditKitZImageSampler", "inputs": {
        **sampler, "latent": ["encoded", 0], "denoise": 0.5}}
    graph["up"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["t2i", 0], "upscale_method": "nearest-exact",
                                                               "scale_by": 2.0}}
    graph["from_upscaled"] = {"class_type": "EditKitZImageSampler", "inputs": {
        **sampler, "latent": ["up", 0], "denoise": 0.5, "decode": False}}
    stages = ("progressive_stages:\n  s1: {width: 32, height: 32, num_inference_steps: 1}\n"
              "  s2: {scale_by: 1.5, num_inference_steps: 1, strength: 0.6}\n")
    graph["progressive"] = {"class_type": "EditKitZImageProgressive", "inputs": {
        "model": ["z", 0], "text_encoder": ["z", 1], "vae": ["z", 2], "prompt": "a red apple", "negative_prompt": "",
        "seed": 5, "stages": stages, "upscale_method": "nearest-exact", "batch_size": 1, "decode_stages": False}}
    for tag, slot in (("t2i", 1), ("from_encoded", 1), ("progressive", 0)):
        _preview(graph, [tag, slot], tag)
    graph["up_save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["from_upscaled", 0],
                                                               "filename_prefix": "editkit_native/zimage_up"}}
    _native_tail(graph, ["t2i", 0], FLUX_VAE, "editkit_native/zimage", "t2i_native")
    graph["progressive_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["progressive", 1],
                                                                         "vae": ["vae", 0]}}
    _preview(graph, ["progressive_decode", 0], "progressive_decoded")
    run = _run(native, graph)

    assert run.output("t2i", 0)["samples"].shape == (1, 16, 4, 4)
    _close(run.output("t2i_native_decode", 0), run.output("t2i", 1))
    _close(run.output("progressive_decode", 0), run.output("progressive", 0))
    _differs(run.output("t2i", 1), run.output("from_encoded", 1))
    # Native VAEEncode equals EditKit's own encode of the picture with the same weights.
    runtime = native.pack_submodule("pipelines.core.runtime").TorchRuntime("cpu")
    vae_ops = native.pack_submodule("pipelines.flux.vae")
    component = run.output("z", 2).get()
    ours = vae_ops.model_to_raw(component, vae_ops.encode(component, run.output("img", 0).movedim(-1, 1), runtime))
    _close(run.output("encoded", 0)["samples"], ours, 1e-4)
    assert run.output("from_upscaled", 0)["samples"].shape == (1, 16, 8, 8)
    assert run.output("progressive", 1)["samples"].shape == (1, 16, 6, 6)
    (loaded, picture), = _load_and_decode(native, {"z": _saved(run, "t2i_native")}, FLUX_VAE).values()
    assert torch.equal(loaded, run.output("t2i", 0)["samples"])
    _close(picture, run.output("t2i_native_decode", 0))
