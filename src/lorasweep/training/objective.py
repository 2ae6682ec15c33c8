"""The diffusion training objective shared by the loop and the validation loss: what the UNet must predict,
and the per-sample weighted MSE (kohya: ``loss.mean([1, 2, 3]) * loss_weights``, then the batch mean)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def training_target(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """ε for an ε-prediction model; v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ for a v-prediction one (``model.v_parameterization``
    sets the scheduler's ``prediction_type``, so sampling and training agree)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample over channels and pixels, in float32 whatever the autocast dtype."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Batch mean of per-sample MSE × weight: regularisation images carry ``training.prior_loss_weight``,
    training images 1 (DreamBooth prior preservation as kohya computes it)."""
    return (per_sample_mse(pred, target) * weights.to(pred.device, torch.float32)).mean()
