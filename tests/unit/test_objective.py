"""The training objective against its published formulas: the ε and v targets, and prior-preservation
weighting of the per-sample loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lorasweep.config.training import TrainingConfig
from lorasweep.training.objective import TrainingLoss, training_target


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def test_epsilon_target_is_the_noise() -> None:
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(training_target(_scheduler("epsilon"), x0, noise, t), noise)


def test_v_target_matches_the_formula() -> None:
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (Salimans & Ho 2022), with ᾱ_t = ∏(1 − β_s) of SD's scaled-linear betas."""
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise.double() - (1 - alpha_bar).sqrt() * x0.double()
    got = training_target(_scheduler("v_prediction"), x0, noise, t)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # At t=999 almost all signal is gone: v ≈ −x₀; at t=0, v ≈ ε.
    assert (got[2] + x0[2]).abs().mean() < 0.1
    assert (got[0] - noise[0]).abs().mean() < 0.1


def test_unknown_prediction_type_is_refused() -> None:
    scheduler = _scheduler("epsilon")
    scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="sample"):
        training_target(scheduler, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1]))


def test_prior_loss_weight_scales_regularisation_samples_only() -> None:
    pred = torch.randn(4, 4, 8, 8)
    target = torch.randn(4, 4, 8, 8)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    weights = torch.tensor([1.0, 1.0, 0.25, 0.25])  # two training images, two reg images at prior_loss_weight 0.25
    expected = (per_sample * weights).mean()
    scheduler = _scheduler("epsilon")
    loss = TrainingLoss(TrainingConfig(), scheduler, scheduler)  # the training loss with every knob off
    t = torch.tensor([10, 200, 500, 900])
    torch.testing.assert_close(loss(pred, target, t, weights), expected)
    # Zero weight: the reg samples give no gradient at all.
    pred.requires_grad_(True)
    loss(pred, target, t, torch.tensor([1.0, 1.0, 0.0, 0.0])).backward()
    assert pred.grad is not None
    assert torch.count_nonzero(pred.grad[2:]) == 0 and torch.count_nonzero(pred.grad[:2]) > 0
