"""The shared sampling core: schedules, denoise conventions, CFG, euler and euler_ancestral."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from editkit.pipelines.core import sampling as core
from editkit.pipelines.core.errors import EditKitError, Interrupted
from editkit.pipelines.core.runtime import TorchRuntime
from editkit.pipelines.flux.loading import CONFIG_DIR

FLUX_SCHEDULER = json.loads((CONFIG_DIR / "flux_scheduler" / "scheduler_config.json").read_text())
STATIC_SHIFT = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": False}


def _diffusers_sigmas(config: dict, n: int, seq_len: int | None) -> torch.Tensor:
    """The reference: diffusers' scheduler set up exactly as its Flux/Z-Image pipelines do it."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = None
    if scheduler.config.use_dynamic_shifting:
        c = scheduler.config
        mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu, device="cpu")
    return scheduler


def test_full_schedule_equals_diffusers_for_flux_and_static_shift():
    for config, seq in ((FLUX_SCHEDULER, 1024), (STATIC_SHIFT, None)):
        ours = core.flow_schedule(config, 9, image_seq_len=seq)
        ref = _diffusers_sigmas(config, 9, seq)
        assert ours.steps == 9
        torch.testing.assert_close(ours.sigmas, ref.sigmas.float(), atol=0, rtol=0)
        torch.testing.assert_close(ours.timesteps, ref.timesteps.float() / 1000, atol=0, rtol=0)


@pytest.mark.parametrize("steps, denoise", [(4, 0.5), (16, 0.7), (16, 0.6), (9, 1.0)])
def test_ksampler_denoise_convention(steps, denoise):
    """KSampler: ``steps`` model calls, taken from the end of an ``int(steps/denoise)``-step schedule."""
    ours = core.flow_schedule(STATIC_SHIFT, steps, denoise=denoise, convention="denoise")
    longer = _diffusers_sigmas(STATIC_SHIFT, int(steps / denoise), None)
    assert ours.steps == steps
    torch.testing.assert_close(ours.sigmas, longer.sigmas.float()[-(steps + 1):], atol=0, rtol=0)
    assert ours.start_sigma == pytest.approx(float(longer.sigmas[-(steps + 1)]))


@pytest.mark.parametrize("steps, strength", [(10, 0.6), (16, 0.7), (16, 0.6), (4, 0.3)])
def test_strength_convention_equals_diffusers_img2img(steps, strength):
    """diffusers img2img: its own ``get_timesteps`` on the same scheduler decides the steps and start."""
    from diffusers import FluxImg2ImgPipeline

    scheduler = _diffusers_sigmas(FLUX_SCHEDULER, steps, 256)
    timesteps, n = FluxImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    ours = core.flow_schedule(FLUX_SCHEDULER, steps, image_seq_len=256, denoise=strength, convention="strength")
    assert ours.steps == n == len(timesteps)
    torch.testing.assert_close(ours.timesteps, timesteps.float() / 1000, atol=0, rtol=0)
    assert ours.start_sigma == pytest.approx(float(scheduler.sigmas[steps - n]))


def test_bad_partial_settings_are_clear():
    with pytest.raises(EditKitError, match="denoise must be greater than 0"):
        core.flow_schedule(STATIC_SHIFT, 4, denoise=0.0)
    with pytest.raises(EditKitError, match="Unknown denoise convention 'foo'"):
        core.flow_schedule(STATIC_SHIFT, 4, denoise=0.5, convention="foo")
    assert core.flow_schedule(STATIC_SHIFT, 2, denoise=0.01, convention="strength").steps == 1
    with pytest.raises(EditKitError, match="Unknown sampler 'dpmpp_2m'.*euler, euler_ancestral"):
        core.SamplerSettings("dpmpp_2m")


class _Velocity:
    """A deterministic nonlinear 'model' that records its calls."""

    def __init__(self, channels: int = 4):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(channels, channels, generator=g) * 0.5
        self.shift = {"cond": torch.randn(channels, generator=g), "uncond": torch.randn(channels, generator=g)}
        self.calls: list[tuple] = []

    def velocity(self, x, sigma, branch):
        return torch.tanh(x @ self.w) + sigma * self.shift[branch]

    def __call__(self, schedule):
        def predict(x, i, branches):
            self.calls.append(branches)
            s = float(schedule.sigmas[i])
            parts = x.chunk(len(branches))
            return torch.cat([self.velocity(p, s, b) for p, b in zip(parts, branches)])
        return predict


def _run(schedule, model, guidance=None, sampler=None, init=None):
    noise = core.seeded_noise((2, 6, 4), 7)
    return core.sample(model(schedule), noise, schedule, TorchRuntime("cpu"), init=init,
                       guidance=guidance or core.Guidance(), sampler=sampler or core.SamplerSettings())


def test_euler_equals_a_hand_written_euler_loop():
    schedule = core.flow_schedule(STATIC_SHIFT, 5)
    model = _Velocity()
    ours = _run(schedule, model)
    x = core.seeded_noise((2, 6, 4), 7)
    s = schedule.sigmas.tolist()
    for i in range(5):
        x = x + (s[i + 1] - s[i]) * model.velocity(x, s[i], "cond")
    torch.testing.assert_close(ours, x, atol=1e-6, rtol=1e-6)


def test_cfg_scale_one_equals_no_cfg_and_skips_the_uncond_call():
    schedule = core.flow_schedule(STATIC_SHIFT, 4)
    plain, one = _Velocity(), _Velocity()
    a = _run(schedule, plain)
    b = _run(schedule, one, guidance=core.Guidance(scale=1.0, enabled=True))
    assert torch.equal(a, b)
    assert one.calls == [("cond",)] * 4


def test_cfg_batched_equals_separate_and_combines_as_documented():
    schedule = core.flow_schedule(STATIC_SHIFT, 3)
    batched, separate = _Velocity(), _Velocity()
    a = _run(schedule, batched, guidance=core.Guidance(scale=4.0))
    b = _run(schedule, separate, guidance=core.Guidance(scale=4.0, batched=False))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert batched.calls == [("cond", "uncond")] * 3
    assert separate.calls == [("cond",), ("uncond",)] * 3
    # One step by hand: uncond + s (cond - uncond), and Qwen's norm rescale of the same.
    one = core.flow_schedule(STATIC_SHIFT, 1)
    x = core.seeded_noise((2, 6, 4), 7)
    ref = _Velocity()
    c, u = ref.velocity(x, 1.0, "cond"), ref.velocity(x, 1.0, "uncond")
    mixed = u + 4.0 * (c - u)
    torch.testing.assert_close(_run(one, _Velocity(), guidance=core.Guidance(scale=4.0)), x - mixed)
    rescaled = mixed * (c.norm(dim=-1, keepdim=True) / mixed.norm(dim=-1, keepdim=True))
    got = _run(one, _Velocity(), guidance=core.Guidance(scale=4.0, rescale="norm"))
    torch.testing.assert_close(got, x - rescaled, atol=1e-6, rtol=1e-6)


def test_euler_ancestral_is_reproducible_and_differs_from_euler():
    schedule = core.flow_schedule(STATIC_SHIFT, 6)
    anc = core.SamplerSettings("euler_ancestral", seed=3)
    a = _run(schedule, _Velocity(), sampler=anc)
    b = _run(schedule, _Velocity(), sampler=anc)
    c = _run(schedule, _Velocity(), sampler=core.SamplerSettings("euler_ancestral", seed=4))
    e = _run(schedule, _Velocity())
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, e)
    # eta 0 removes the re-noising: plain euler.
    zero = _run(schedule, _Velocity(), sampler=core.SamplerSettings("euler_ancestral", eta=0.0, seed=3))
    torch.testing.assert_close(zero, e, atol=1e-6, rtol=1e-6)


def test_partial_denoise_starts_from_the_noised_init():
    schedule = core.flow_schedule(STATIC_SHIFT, 3, denoise=0.5)
    init = torch.full((2, 6, 4), 0.25)
    seen = []

    def predict(x, i, branches):
        seen.append(x.clone())
        return torch.zeros_like(x)

    noise = core.seeded_noise((2, 6, 4), 7)
    core.sample(predict, noise, schedule, TorchRuntime("cpu"), init=init)
    s0 = schedule.start_sigma
    torch.testing.assert_close(seen[0], s0 * noise + (1 - s0) * init)


def test_interrupt_is_checked_every_step():
    runtime = TorchRuntime("cpu")
    schedule = core.flow_schedule(STATIC_SHIFT, 5)
    calls = []

    def predict(x, i, branches):
        calls.append(i)
        if i == 1:
            runtime.interrupt()
        return torch.zeros_like(x)

    with pytest.raises(Interrupted):
        core.sample(predict, core.seeded_noise((1, 2, 4), 0), schedule, runtime)
    assert calls == [0, 1]


def test_euler_ancestral_equals_comfyui(comfyui):
    """Same model function, sigmas and seed: ComfyUI's sample_euler_ancestral_RF (its default CPU noise
    sampler seeded with the KSampler seed) and the core give the same latent."""
    from comfy.k_diffusion import sampling as kd

    schedule = core.flow_schedule(FLUX_SCHEDULER, 6, image_seq_len=64)
    model = _Velocity()
    noise = core.seeded_noise((2, 6, 4), 7)
    for eta, s_noise in ((1.0, 1.0), (0.6, 0.8)):
        ours = core.sample(model(schedule), noise, schedule, TorchRuntime("cpu"),
                           sampler=core.SamplerSettings("euler_ancestral", eta=eta, s_noise=s_noise, seed=123))
        index = {float(s): i for i, s in enumerate(schedule.sigmas[:-1])}

        def denoiser(x, sigma, **_):
            s = float(sigma[0])
            return x - s * model.velocity(x, s, "cond")

        with torch.inference_mode():
            theirs = kd.sample_euler_ancestral_RF(denoiser, noise.clone(), schedule.sigmas.clone(),
                                                  extra_args={"seed": 123}, disable=True, eta=eta, s_noise=s_noise)
        assert len(index) == 6
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
