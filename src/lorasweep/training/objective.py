"""The diffusion training objective: what the UNet must predict (shared with the validation loss, which stays
plain MSE against the base schedule), and the training loss with kohya sd-scripts' options — loss type with
its Huber schedule, min-SNR-γ and debiased-estimation weights (kohya: ``conditional_loss`` →
``mean([1, 2, 3])`` → ``× loss_weights`` → ``apply_snr_weight`` → ``apply_debiased_estimation`` → batch mean).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lorasweep.config.training import HUBER_LOSSES, TrainingConfig


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


def snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR_t = ᾱ_t/(1 − ᾱ_t) for every timestep, computed as kohya's ``all_snr`` does ((√ᾱ/√(1 − ᾱ))²)."""
    return (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


def debiased_weight(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2023), SNR capped at 1000 as kohya does: 1/√SNR for ε, 1/(SNR + 1) for v."""
    capped = torch.clamp(snr, max=1000.0)
    return 1.0 / (capped + 1) if v_prediction else 1.0 / capped.sqrt()


def huber_threshold(cfg: TrainingConfig, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                    num_train_timesteps: int) -> torch.Tensor | None:
    """The per-sample Huber c(t) for huber/smooth_l1 (None for l2/l1), kohya's ``get_huber_threshold_if_needed``:
    ``snr`` (1 − c)/(1 + σ_t)² + c with σ_t = √((1 − ᾱ_t)/ᾱ_t) — ``huber_scale`` is not applied, as in kohya;
    ``exponential`` exp(ln(c)·t/T)·scale; ``constant`` c·scale."""
    if cfg.loss_type not in HUBER_LOSSES:
        return None
    c = cfg.huber_c
    if cfg.huber_schedule == "snr":
        alphas = alphas_cumprod.to(timesteps.device)[timesteps]
        sigmas = ((1.0 - alphas) / alphas) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    if cfg.huber_schedule == "exponential":
        return torch.exp(math.log(c) / num_train_timesteps * timesteps) * cfg.huber_scale
    return torch.full(timesteps.shape, c * cfg.huber_scale, device=timesteps.device)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The unreduced loss: squared (l2) or absolute (l1) error; with d = pred − target and c per sample,
    huber 2c(√(d² + c²) − c) and smooth_l1 2(√(d² + c²) − c) (kohya's ``conditional_loss``)."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs a Huber threshold")
    c = huber_c.view(-1, *([1] * (pred.dim() - 1)))
    core = torch.sqrt((pred - target) ** 2 + c**2) - c
    if loss_type == "huber":
        return 2 * c * core
    if loss_type == "smooth_l1":
        return 2 * core
    raise ValueError(f"unsupported loss_type {loss_type!r}")


class TrainingLoss:
    """The training loss of one micro-batch, as ``training.*`` configures it: per-element loss (float32), mean
    over channels and pixels, × the per-sample prior-loss weights, × min-SNR-γ and/or debiased weights (both
    multiply when both are on, as kohya applies them in sequence), batch mean. With the defaults it is exactly
    the batch mean of :func:`per_sample_mse` × weight (regularisation images carry ``training.prior_loss_weight``,
    training images 1: DreamBooth prior preservation as kohya computes it).

    ``scheduler`` is the training scheduler (its ᾱ feed the Huber ``snr`` schedule, its prediction type the
    v/ε choice); the SNR weights read ``snr_scheduler``'s ᾱ — the base schedule, also under
    ``zero_terminal_snr``, because kohya computes its ``all_snr`` before rescaling the betas (which also keeps
    the ε weights finite at SNR 0)."""

    def __init__(self, cfg: TrainingConfig, scheduler: Any, snr_scheduler: Any) -> None:
        self.cfg = cfg
        self.v_prediction = scheduler.config.prediction_type == "v_prediction"
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().clone()
        self.snr = snr_table(snr_scheduler.alphas_cumprod.detach().clone())

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        huber_c = huber_threshold(cfg, timesteps, self.alphas_cumprod, self.num_train_timesteps)
        per_element = elementwise_loss(pred.float(), target.float(), cfg.loss_type, huber_c)
        loss = per_element.mean(dim=tuple(range(1, pred.dim()))) * weights.to(pred.device, torch.float32)
        if cfg.min_snr_gamma is not None or cfg.debiased_estimation:
            snr = self.snr.to(timesteps.device)[timesteps]
            if cfg.min_snr_gamma is not None:
                loss = loss * min_snr_weight(snr, cfg.min_snr_gamma, self.v_prediction).float()
            if cfg.debiased_estimation:
                loss = loss * debiased_weight(snr, self.v_prediction).float()
        return loss.mean()
