"""The progressive recipe's YAML: the seed team's keys, EditKit's additions, and every bad input named by stage."""

from __future__ import annotations

import pytest
import torch

from editkit.pipelines.core.errors import EditKitError
from editkit.pipelines.zimage.latents import scaled_size, upscale_raw, upscale_size
from editkit.pipelines.zimage.recipe import DEFAULT_STAGES_YAML, parse_recipe

SEED_YAML = """
progressive_stages:
  stage1:
    height: 224
    width: 176
    num_inference_steps: 9
    guidance_scale: 2.0
  stage2:
    height: 432
    width: 336
    num_inference_steps: 16
    guidance_scale: 1.0
    strength: 0.7
  stage3:
    height: 864
    width: 672
    num_inference_steps: 16
    guidance_scale: 1.0
    strength: 0.6
"""


def test_the_seed_teams_keys_are_read_in_order():
    recipe = parse_recipe(SEED_YAML)
    assert [(s.name, s.width, s.height, s.steps, s.cfg, s.strength) for s in recipe.stages] == [
        ("stage1", 176, 224, 9, 2.0, None), ("stage2", 336, 432, 16, 1.0, 0.7), ("stage3", 672, 864, 16, 1.0, 0.6)]
    assert recipe.convention == "denoise" and recipe.shift == 3.0
    assert [recipe.model_calls(s) for s in recipe.stages] == [9, 16, 16]
    assert [s.tokens for s in recipe.stages] == [11 * 14, 21 * 27, 42 * 54]


def test_the_default_text_is_the_seed_table_with_editkit_settings():
    recipe = parse_recipe(DEFAULT_STAGES_YAML)
    assert [(s.width, s.height, s.steps, s.cfg, s.strength) for s in recipe.stages] == [
        (176, 224, 9, 2.0, None), (336, 432, 16, 1.0, 0.7), (672, 864, 16, 1.0, 0.6)]
    assert {s.sampler for s in recipe.stages} == {"euler_ancestral"}


def test_diffusers_conventions_and_scale_by():
    recipe = parse_recipe(SEED_YAML.replace("progressive_stages:", "strength_convention: strength\n"
                                            "guidance_convention: diffusers\nprogressive_stages:")
                          .replace("    height: 864\n    width: 672\n", "    scale_by: 2.0\n"))
    assert [s.cfg for s in recipe.stages] == [3.0, 2.0, 2.0]  # diffusers' g is EditKit's cfg g + 1
    assert (recipe.stages[2].width, recipe.stages[2].height) == (672, 864)
    # diffusers' get_timesteps: 16 x 0.7 runs 12 calls, 16 x 0.6 runs 10
    assert [recipe.model_calls(s) for s in recipe.stages] == [9, 12, 10]


def test_a_list_of_stages_and_one_stage_work():
    recipe = parse_recipe({"progressive_stages": [{"width": 672, "height": 864}]})
    assert len(recipe.stages) == 1 and recipe.stages[0].steps == 9 and recipe.stages[0].strength is None


@pytest.mark.parametrize("change, message", [
    (("    guidance_scale: 1.0\n    strength: 0.7", "    guidance_scale: 1.0\n    strenght: 0.7"),
     "stage2: unknown key\\(s\\) 'strenght'"),
    (("progressive_stages:", "steps: 4\nprogressive_stages:"), "top level: unknown key\\(s\\) 'steps'"),
    (("    width: 176", "    width: 170"), "stage1: width 170 is not a multiple of 16.*nearest valid width is 176"),
    (("    height: 432", "    height: 430"), "stage2: height 430 .*nearest valid height is 432"),
    (("    strength: 0.7\n", ""), "stage2: every stage after the first .* needs a 'strength'"),
    (("    strength: 0.6", "    strength: 1.5"), "stage3: strength must be greater than 0 and at most 1 \\(got 1.5\\)"),
    (("    strength: 0.6", "    strength: 0"), "stage3: strength must be greater than 0"),
    (("    height: 864\n    width: 672", "    height: 400\n    width: 320"),
     "stage3: 320x400 is smaller than the previous stage's 336x432"),
    (("    guidance_scale: 2.0", "    guidance_scale: 2.0\n    strength: 0.5"), "stage1: the first stage .* no 'strength'"),
    (("    num_inference_steps: 9", "    num_inference_steps: 0"), "stage1: num_inference_steps must be at least 1"),
    (("    num_inference_steps: 9", "    num_inference_steps: nine"), "stage1: 'num_inference_steps' must be a whole"),
    (("progressive_stages:", "sampler: dpmpp_2m\nprogressive_stages:"), "unknown sampler 'dpmpp_2m'"),
])
def test_bad_recipes_name_the_stage(change, message):
    old, new = change
    assert old in SEED_YAML
    with pytest.raises(EditKitError, match=message):
        parse_recipe(SEED_YAML.replace(old, new, 1))


def test_scale_by_giving_an_invalid_size_suggests_one():
    text = SEED_YAML.replace("    height: 864\n    width: 672\n", "    scale_by: 1.5\n")
    with pytest.raises(EditKitError, match="stage3: scale_by 1.5 turns 336x432 into 504x648.*width: 512"):
        parse_recipe(text)


def test_not_yaml_and_empty_recipes():
    with pytest.raises(EditKitError, match="not valid YAML"):
        parse_recipe("progressive_stages: [")
    with pytest.raises(EditKitError, match="must list at least one stage"):
        parse_recipe("progressive_stages: {}")


def test_nearest_exact_latent_upscale_is_comfyuis_call():
    """ComfyUI's LatentUpscale(By) run F.interpolate(mode=...) on the raw latent (checked against the real
    nodes in test_zimage_comfy.py); nearest-exact doubles each latent pixel exactly."""
    raw = torch.randn(2, 16, 27, 21, generator=torch.Generator().manual_seed(1))
    doubled = upscale_raw(raw, 336, 432)
    assert doubled.shape == (2, 16, 54, 42)
    assert torch.equal(doubled, raw.repeat_interleave(2, -1).repeat_interleave(2, -2))
    # A non-integer ratio picks source pixel floor((i + 0.5) * in / out) on each axis ("nearest-exact").
    small = torch.randn(1, 16, 14, 11, generator=torch.Generator().manual_seed(2))
    rows = [int((i + 0.5) * 14 / 54) for i in range(54)]
    cols = [int((j + 0.5) * 11 / 42) for j in range(42)]
    assert torch.equal(upscale_raw(small, 336, 432), small[:, :, rows][:, :, :, cols])
    assert scaled_size(21, 27, 2.0) == (336, 432)
    with pytest.raises(EditKitError, match="Unknown upscale method 'bislerp'"):
        upscale_raw(raw, 336, 432, "bislerp")


def test_later_stages_below_64_pixels_take_latent_upscales_64():
    """A later stage's width/height go through LatentUpscale, which raises a side below 64 px to 64 (fault 8)."""
    text = ("progressive_stages:\n  s1: {width: 32, height: 16}\n  s2: {width: 48, height: 96, strength: 0.5}\n"
            "  s3: {scale_by: 2.0, strength: 0.5}\n")
    recipe = parse_recipe(text)
    assert [(s.width, s.height) for s in recipe.stages] == [(32, 16), (64, 96), (128, 192)]
    assert upscale_size(48, 96) == (64, 96) and upscale_size(16, 640) == (64, 640) and upscale_size(64, 80) == (64, 80)
