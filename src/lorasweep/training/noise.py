"""The noise side of the training objective: the noise drawn for each step (offset noise, pyramid noise),
its timesteps, the input perturbation of the noisy latents, and the zero-terminal-SNR training scheduler.

Semantics and order are kohya sd-scripts' (``train_util.get_noise_noisy_latents_and_timesteps``): noise →
noise offset (random strength, adaptive scale) → pyramid noise → timesteps → input perturbation, which
changes only the noisy latents (the target stays the unperturbed noise, or its v). Unlike kohya, every random
number comes from the loop's ``noise`` generator — never Python's ``random`` or torch's global RNG — so a run
is reproducible bit for bit and a resumed run continues the same noise (the generator's state is saved in the
training state). With every knob off the draws are exactly the loop's original ``randn`` + ``randint``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorasweep.config.training import TrainingConfig
from lorasweep.errors import UserError


def training_scheduler(base_scheduler: Any, cfg: TrainingConfig) -> Any:
    """The scheduler training noises with: the base model's own, or with ``zero_terminal_snr`` a copy whose
    betas diffusers rescales so that ᾱ_T = 0 (``rescale_betas_zero_snr``, Lin et al. 2023, Algorithm 1).
    The base scheduler is never changed: the validation loss measures against it, and a cached base model is
    shared by later runs of the process."""
    cfg.check_with(v_parameterization=base_scheduler.config.prediction_type == "v_prediction")
    if not cfg.zero_terminal_snr:
        return base_scheduler
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(base_scheduler.config, rescale_betas_zero_snr=True)


def _uniform(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One U[0, 1) number as a 1-element tensor on ``device`` (kohya: ``torch.rand(1)``)."""
    return torch.rand(1, generator=generator, device=device)


def offset_noise(latents: torch.Tensor, noise: torch.Tensor, offset: float | torch.Tensor, adaptive_scale: float,
                 generator: torch.Generator) -> torch.Tensor:
    """noise + o·N(0, 1) with one normal number per sample and channel, broadcast over the image (Guttenberg's
    offset noise). ``adaptive_scale`` ≠ 0: o = max(0, offset + adaptive_scale·|mean over H, W of the latent|)
    per sample and channel (kohya's ``apply_noise_offset``)."""
    if adaptive_scale:
        offset = (offset + adaptive_scale * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0.0)
    shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device)
    return noise + offset * shift


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise (Whitaker; kohya's ``pyramid_noise_like``): level i adds N(0, 1) drawn at
    (H, W)/r_i^i, r_i ∈ U[2, 4), bilinearly upsampled to (H, W) and weighted discount^i (level 0 is full-size
    noise); it stops after the first level that is 1 pixel high or wide; the sum is divided by its std over
    the whole batch. The ``iterations`` factors r_i are drawn first, in one go, so the sizes cost one device
    sync per step (kohya draws each from Python's ``random``)."""
    batch, channels, height, width = noise.shape
    factors = (torch.rand(iterations, generator=generator, device=noise.device) * 2 + 2).tolist()
    out = noise
    for i, r in enumerate(factors):
        h, w = max(1, int(height / r**i)), max(1, int(width / r**i))
        level = torch.randn((batch, channels, h, w), generator=generator, device=noise.device)
        out = out + F.interpolate(level, size=(height, width), mode="bilinear", align_corners=False) * discount**i
        if h == 1 or w == 1:
            break
    return out / out.std()


def draw_noise(latents: torch.Tensor, cfg: TrainingConfig, generator: torch.Generator) -> torch.Tensor:
    """ε for one step: N(0, 1) like ``latents``, then offset noise, then pyramid noise when enabled."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if cfg.noise_offset:
        offset: float | torch.Tensor = cfg.noise_offset
        if cfg.noise_offset_random_strength:
            offset = _uniform(generator, latents.device) * cfg.noise_offset
        noise = offset_noise(latents, noise, offset, cfg.adaptive_noise_scale, generator)
    if cfg.multires_noise_iterations:
        noise = pyramid_noise(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, generator)
    return noise


def draw_timesteps(batch: int, cfg: TrainingConfig, num_train_timesteps: int, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep); all equal to them when they are equal
    (kohya's ``get_timesteps``, which then draws nothing)."""
    if cfg.max_timestep > num_train_timesteps:
        raise UserError("training.max_timestep", f"is {cfg.max_timestep}, but the base model's scheduler has only "
                        f"{num_train_timesteps} timesteps.", f"Set `training.max_timestep={num_train_timesteps}` "
                        "or lower.")
    if cfg.min_timestep == cfg.max_timestep:
        return torch.full((batch,), cfg.max_timestep, dtype=torch.long, device=device)
    return torch.randint(cfg.min_timestep, cfg.max_timestep, (batch,), generator=generator, device=device)


def perturbed_noise(noise: torch.Tensor, cfg: TrainingConfig, generator: torch.Generator) -> torch.Tensor:
    """The noise that builds the noisy input: with ``ip_noise_gamma`` γ, noise + γ·N(0, 1) (γ ~ U[0, γ) per
    step with the random strength), else ``noise`` itself."""
    if not cfg.ip_noise_gamma:
        return noise
    gamma: float | torch.Tensor = cfg.ip_noise_gamma
    if cfg.ip_noise_gamma_random_strength:
        gamma = _uniform(generator, noise.device) * cfg.ip_noise_gamma
    return noise + gamma * torch.randn(noise.shape, generator=generator, device=noise.device)


def noisy_latents(scheduler: Any, latents: torch.Tensor, cfg: TrainingConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, noisy latents, timesteps) of one step, in kohya's order. ``noise`` is the target's ε: the
    input perturbation is in the noisy latents only."""
    noise = draw_noise(latents, cfg, generator)
    timesteps = draw_timesteps(latents.shape[0], cfg, scheduler.config.num_train_timesteps, generator,
                               latents.device)
    noisy = scheduler.add_noise(latents, perturbed_noise(noise, cfg, generator), timesteps)
    return noise, noisy, timesteps
