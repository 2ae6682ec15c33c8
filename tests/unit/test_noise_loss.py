"""The loss and noise knobs (``training.*``) against their published formulas on fixed tiny tensors. Expected
values are computed here with plain torch, replaying the documented draw order on a generator of the same
seed; a default config must reproduce the loop's original draws and loss bit for bit."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lorasweep.config.training import TrainingConfig
from lorasweep.errors import UserError
from lorasweep.training.noise import draw_noise, draw_timesteps, noisy_latents, pyramid_noise, training_scheduler
from lorasweep.training.objective import TrainingLoss, huber_threshold, per_sample_mse

SEED = 7


def sd_scheduler(prediction: str = "epsilon") -> Any:
    """The SD 1.x/2.x training schedule (scaled-linear betas 0.00085–0.012 over 1000 steps)."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, prediction_type=prediction)


def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cfg(**values: Any) -> TrainingConfig:
    config = TrainingConfig(**values)
    config.validate()
    return config


@pytest.fixture
def latents() -> torch.Tensor:
    return torch.randn((3, 4, 8, 8), generator=gen(123)) * 0.8 + 0.3


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t of the SD schedule, from its betas."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, dim=0)[t]


# ---------------------------------------------------------------------------------------------- defaults

def test_defaults_draw_and_weigh_exactly_as_before(latents: torch.Tensor) -> None:
    """All knobs off: the loop's original randn + randint + add_noise and per-sample MSE × prior weights."""
    scheduler = sd_scheduler()
    noise, noisy, timesteps = noisy_latents(scheduler, latents, cfg(), gen())
    g = gen()
    expected_noise = torch.randn(latents.shape, generator=g)
    expected_t = torch.randint(0, 1000, (3,), generator=g)
    assert torch.equal(noise, expected_noise) and torch.equal(timesteps, expected_t)
    assert torch.equal(noisy, scheduler.add_noise(latents, expected_noise, expected_t))
    pred, weights = torch.randn(latents.shape, generator=gen(1)), torch.tensor([1.0, 0.5, 1.0])
    loss = TrainingLoss(cfg(), scheduler, scheduler)(pred, noise, timesteps, weights)
    assert torch.equal(loss, (per_sample_mse(pred, noise) * weights).mean())  # the loop's loss before the knobs
    by_hand = (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_same_seed_same_noise_other_seed_other_noise(latents: torch.Tensor) -> None:
    config = cfg(multires_noise_iterations=4, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                 min_timestep=100, max_timestep=800)
    scheduler = sd_scheduler()
    first, again, other = (noisy_latents(scheduler, latents, config, gen(s)) for s in (SEED, SEED, SEED + 1))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


def test_a_saved_generator_state_continues_the_same_noise(latents: torch.Tensor) -> None:
    """Resume: the noise generator's state is all a training state needs, pyramid factors included."""
    config = cfg(multires_noise_iterations=3, ip_noise_gamma=0.05)
    g = gen()
    noisy_latents(sd_scheduler(), latents, config, g)
    saved = g.get_state()
    straight = noisy_latents(sd_scheduler(), latents, config, g)
    resumed = torch.Generator()
    resumed.set_state(saved)
    assert all(torch.equal(a, b) for a, b in
               zip(straight, noisy_latents(sd_scheduler(), latents, config, resumed), strict=True))


# ---------------------------------------------------------------------------------------------- noise

def test_noise_offset_per_sample_and_channel(latents: torch.Tensor) -> None:
    g = gen()
    noise = torch.randn(latents.shape, generator=g)
    expected = noise + 0.1 * torch.randn((3, 4, 1, 1), generator=g)
    assert torch.allclose(draw_noise(latents, cfg(noise_offset=0.1), gen()), expected, atol=0, rtol=0)


def test_noise_offset_random_strength_and_adaptive_scale(latents: torch.Tensor) -> None:
    g = gen()
    noise = torch.randn(latents.shape, generator=g)
    strength = torch.rand(1, generator=g).item() * 0.1
    offset = torch.clamp(strength + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0.0)
    expected = noise + offset * torch.randn((3, 4, 1, 1), generator=g)
    config = cfg(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.5)
    assert torch.allclose(draw_noise(latents, config, gen()), expected, atol=1e-6)
    negative = cfg(noise_offset=0.01, adaptive_noise_scale=-10.0)  # the offset is clamped at 0: pure noise
    assert torch.equal(draw_noise(latents, negative, gen()), torch.randn(latents.shape, generator=gen()))


def test_pyramid_noise_levels_discount_and_unit_std() -> None:
    g = gen()
    noise = torch.randn((2, 3, 16, 12), generator=g)
    r = (torch.rand(2, generator=g) * 2 + 2).tolist()
    total = noise + torch.randn((2, 3, 16, 12), generator=g)  # level 0: full size, weight 1
    small = torch.randn((2, 3, int(16 / r[1]), int(12 / r[1])), generator=g)
    total = total + torch.nn.Upsample(size=(16, 12), mode="bilinear")(small) * 0.3
    got = pyramid_noise(torch.randn((2, 3, 16, 12), generator=gen()), 2, 0.3, gen_after_noise())
    assert torch.allclose(got, total / total.std(), atol=1e-6)
    assert got.std().item() == pytest.approx(1.0, abs=1e-6)


def gen_after_noise() -> torch.Generator:
    g = gen()
    torch.randn((2, 3, 16, 12), generator=g)
    return g


def test_pyramid_noise_stops_at_one_pixel() -> None:
    """On a 4×4 latent the level-1 noise is 1 pixel (4/r < 2), so levels 2–4 draw nothing."""
    g = gen()
    pyramid_noise(torch.zeros((1, 1, 4, 4)), 5, 0.3, g)
    replay = gen()
    torch.rand(5, generator=replay)
    torch.randn((1, 1, 4, 4), generator=replay)
    torch.randn((1, 1, 1, 1), generator=replay)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=replay))


def test_timestep_range_and_fixed_timestep() -> None:
    drawn = draw_timesteps(2000, cfg(min_timestep=200, max_timestep=300), 1000, gen(), torch.device("cpu"))
    assert torch.equal(drawn, torch.randint(200, 300, (2000,), generator=gen()))
    assert drawn.min().item() == 200 and drawn.max().item() == 299
    g = gen()
    fixed = draw_timesteps(3, cfg(min_timestep=500, max_timestep=500), 1000, g, torch.device("cpu"))
    assert fixed.tolist() == [500, 500, 500] and fixed.dtype == torch.long
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=gen()))  # nothing drawn
    with pytest.raises(UserError, match=r"training\.max_timestep"):
        draw_timesteps(3, cfg(), 500, gen(), torch.device("cpu"))


def test_every_knob_in_kohyas_order_with_input_perturbation(latents: torch.Tensor) -> None:
    """noise → offset (random strength) → timesteps → ip noise (random strength) in the input only."""
    config = cfg(noise_offset=0.1, noise_offset_random_strength=True, ip_noise_gamma=0.2,
                 ip_noise_gamma_random_strength=True, min_timestep=10, max_timestep=990)
    g = gen()
    eps = torch.randn(latents.shape, generator=g)
    eps = eps + torch.rand(1, generator=g) * 0.1 * torch.randn((3, 4, 1, 1), generator=g)
    t = torch.randint(10, 990, (3,), generator=g)
    perturbed = eps + torch.rand(1, generator=g) * 0.2 * torch.randn(latents.shape, generator=g)
    a = alpha_bar(t).view(-1, 1, 1, 1)
    noise, noisy, timesteps = noisy_latents(sd_scheduler(), latents, config, gen())
    assert torch.equal(timesteps, t)
    assert torch.allclose(noise, eps, atol=1e-6)  # the target's ε is unperturbed
    assert torch.allclose(noisy, a.sqrt() * latents + (1 - a).sqrt() * perturbed, atol=1e-5)


def test_zero_terminal_snr_scheduler_is_the_papers_rescale() -> None:
    """Lin et al. 2023, Algorithm 1: shift √ᾱ so its last value is 0, scale so its first is unchanged."""
    base = sd_scheduler("v_prediction")
    assert training_scheduler(base, cfg()) is base
    rescaled = training_scheduler(base, cfg(zero_terminal_snr=True))
    root = alpha_bar(torch.arange(1000)).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert torch.allclose(rescaled.alphas_cumprod, root**2, atol=1e-6)
    assert base.alphas_cumprod[-1].item() > 0  # the base schedule (validation's yardstick) is untouched
    with pytest.raises(UserError, match=r"training\.zero_terminal_snr.*model\.v_parameterization"):
        training_scheduler(sd_scheduler("epsilon"), cfg(zero_terminal_snr=True))


# ---------------------------------------------------------------------------------------------- loss

@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = gen(5)
    return {"pred": torch.randn((3, 2, 4, 4), generator=g), "target": torch.randn((3, 2, 4, 4), generator=g),
            "t": torch.tensor([0, 250, 999]), "w": torch.tensor([1.0, 1.0, 0.5])}


def loss_of(config: TrainingConfig, b: dict[str, torch.Tensor], scheduler: Any = None,
            snr_scheduler: Any = None) -> float:
    scheduler = scheduler or sd_scheduler()
    fn = TrainingLoss(config, scheduler, snr_scheduler or scheduler)
    return fn(b["pred"], b["target"], b["t"], b["w"]).item()


def per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=(1, 2, 3))


def test_l1_loss(batch: dict[str, torch.Tensor]) -> None:
    expected = (per_sample((batch["pred"] - batch["target"]).abs()) * batch["w"]).mean()
    assert loss_of(cfg(loss_type="l1"), batch) == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["huber", "smooth_l1"])
def test_huber_and_smooth_l1_with_a_constant_threshold(batch: dict[str, torch.Tensor], kind: str) -> None:
    c = 0.2 * 1.5
    d = batch["pred"] - batch["target"]
    element = 2 * (torch.sqrt(d**2 + c**2) - c) * (c if kind == "huber" else 1.0)
    expected = (per_sample(element) * batch["w"]).mean()
    config = cfg(loss_type=kind, huber_c=0.2, huber_schedule="constant", huber_scale=1.5)
    assert loss_of(config, batch) == pytest.approx(expected.item(), rel=1e-6)


def test_huber_threshold_schedules() -> None:
    t = torch.tensor([0, 100, 500, 999])
    ab = alpha_bar(t)
    sigma = ((1 - ab) / ab).sqrt()
    snr = huber_threshold(cfg(loss_type="huber", huber_c=0.1, huber_scale=3.0), t, alpha_bar(torch.arange(1000)), 1000)
    assert snr is not None  # huber_scale is not applied in the snr schedule (kohya)
    assert torch.allclose(snr, 0.9 / (1 + sigma) ** 2 + 0.1, rtol=1e-5)
    exp = huber_threshold(cfg(loss_type="huber", huber_c=0.1, huber_schedule="exponential", huber_scale=2.0), t,
                          alpha_bar(torch.arange(1000)), 1000)
    assert exp is not None
    assert torch.allclose(exp, torch.tensor([0.1 ** (s / 1000) * 2.0 for s in t.tolist()]), rtol=1e-5)
    assert huber_threshold(cfg(loss_type="l2"), t, alpha_bar(torch.arange(1000)), 1000) is None


def snr_at(t: torch.Tensor) -> torch.Tensor:
    ab = alpha_bar(t)
    return ab / (1 - ab)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights(batch: dict[str, torch.Tensor], prediction: str) -> None:
    snr = snr_at(batch["t"])
    weight = torch.clamp(snr, max=5.0) / (snr + 1 if prediction == "v_prediction" else snr)
    mse = per_sample((batch["pred"] - batch["target"]) ** 2)
    expected = (mse * batch["w"] * weight).mean()
    assert loss_of(cfg(min_snr_gamma=5.0), batch, sd_scheduler(prediction)) == pytest.approx(expected.item(),
                                                                                                 rel=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_estimation_alone_and_with_min_snr(batch: dict[str, torch.Tensor], prediction: str) -> None:
    snr = snr_at(batch["t"])
    capped = torch.clamp(snr, max=1000.0)
    v = prediction == "v_prediction"
    debiased = 1 / (capped + 1) if v else 1 / capped.sqrt()
    mse = per_sample((batch["pred"] - batch["target"]) ** 2) * batch["w"]
    scheduler = sd_scheduler(prediction)
    assert loss_of(cfg(debiased_estimation=True), batch, scheduler) == pytest.approx(
        (mse * debiased).mean().item(), rel=1e-5)
    min_snr = torch.clamp(snr, max=2.0) / (snr + 1 if v else snr)
    assert loss_of(cfg(debiased_estimation=True, min_snr_gamma=2.0), batch, scheduler) == pytest.approx(
        (mse * min_snr * debiased).mean().item(), rel=1e-5)


def test_zero_terminal_snr_weights_use_the_base_snr_and_huber_the_rescaled_schedule(
        batch: dict[str, torch.Tensor]) -> None:
    """As kohya: SNR weights from the base schedule (finite at t = 999), Huber c(t) from the rescaled one."""
    base = sd_scheduler("v_prediction")
    rescaled = training_scheduler(base, cfg(zero_terminal_snr=True))
    snr = snr_at(batch["t"])
    mse = per_sample((batch["pred"] - batch["target"]) ** 2) * batch["w"]
    expected = (mse * torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    got = loss_of(cfg(zero_terminal_snr=True, min_snr_gamma=5.0), batch, rescaled, base)
    assert math.isfinite(got) and got == pytest.approx(expected.item(), rel=1e-5)
    c = huber_threshold(cfg(loss_type="huber", huber_c=0.1), batch["t"], rescaled.alphas_cumprod, 1000)
    assert c is not None and c[-1].item() == pytest.approx(0.1)  # σ = ∞ at SNR 0


def test_loss_is_float32_under_half_inputs(batch: dict[str, torch.Tensor]) -> None:
    half = {**batch, "pred": batch["pred"].bfloat16(), "target": batch["target"].bfloat16()}
    fn = TrainingLoss(cfg(loss_type="huber"), sd_scheduler(), sd_scheduler())
    assert fn(half["pred"], half["target"], half["t"], half["w"]).dtype == torch.float32
    assert F.mse_loss(half["pred"], half["target"]).dtype == torch.bfloat16  # what the .float() avoids


# ---------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("values", "names"), [
    ({"loss_type": "l3"}, ["training.loss_type"]),
    ({"huber_schedule": "cosine", "loss_type": "huber"}, ["training.huber_schedule"]),
    ({"huber_c": 0.0, "loss_type": "huber"}, ["training.huber_c"]),
    ({"huber_scale": -1.0, "loss_type": "huber"}, ["training.huber_scale"]),
    ({"huber_c": 0.2}, ["training.huber_c", "training.loss_type"]),
    ({"huber_schedule": "constant", "loss_type": "l1"}, ["training.huber_schedule", "training.loss_type"]),
    ({"huber_scale": 2.0}, ["training.huber_scale", "training.loss_type"]),
    ({"min_snr_gamma": 0.0}, ["training.min_snr_gamma"]),
    ({"noise_offset": -0.1}, ["training.noise_offset"]),
    ({"noise_offset_random_strength": True}, ["training.noise_offset_random_strength", "training.noise_offset"]),
    ({"adaptive_noise_scale": 0.1}, ["training.adaptive_noise_scale", "training.noise_offset"]),
    ({"multires_noise_iterations": -1}, ["training.multires_noise_iterations"]),
    ({"multires_noise_discount": 0.5}, ["training.multires_noise_discount", "training.multires_noise_iterations"]),
    ({"multires_noise_discount": 1.5, "multires_noise_iterations": 6}, ["training.multires_noise_discount"]),
    ({"noise_offset": 0.1, "multires_noise_iterations": 6},
     ["training.noise_offset", "training.multires_noise_iterations"]),
    ({"ip_noise_gamma": -0.1}, ["training.ip_noise_gamma"]),
    ({"ip_noise_gamma_random_strength": True}, ["training.ip_noise_gamma_random_strength", "training.ip_noise_gamma"]),
    ({"min_timestep": -1}, ["training.min_timestep"]),
    ({"max_timestep": 1001}, ["training.max_timestep"]),
    ({"min_timestep": 600, "max_timestep": 400}, ["training.min_timestep", "training.max_timestep"]),
])
def test_bad_values_and_combinations_are_refused_naming_the_keys(values: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(UserError) as caught:
        TrainingConfig(**values).validate()
    paragraph = caught.value.paragraph()
    assert "\n" not in paragraph
    for name in names:
        assert name in paragraph, paragraph


def test_zero_terminal_snr_needs_v_parameterization() -> None:
    config = cfg(zero_terminal_snr=True)
    config.check_with(v_parameterization=True)
    with pytest.raises(UserError) as caught:
        config.check_with(v_parameterization=False)
    assert caught.value.where == "training.zero_terminal_snr" and "model.v_parameterization" in str(caught.value)
