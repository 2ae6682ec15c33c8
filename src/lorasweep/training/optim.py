"""Optimizer with per-component learning rates, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from lorasweep.config.optimizer import OptimizerConfig
from lorasweep.config.scheduler import SchedulerConfig


def build_optimizer(cfg: OptimizerConfig, unet_params: list[torch.nn.Parameter],
                    text_encoder_params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """One param group per trained component, so ``unet_lr``/``text_encoder_lr`` differ as in kohya.

    Group order is fixed (UNet first): logged LRs and saved optimizer states depend on it.
    """
    groups = []
    if unet_params:
        groups.append({"params": unet_params, "lr": cfg.unet_learning_rate, "name": "unet"})
    if text_encoder_params:
        groups.append({"params": text_encoder_params, "lr": cfg.text_encoder_learning_rate,
                       "name": "text_encoder"})
    # foreach is deterministic on CPU and fast on CUDA; fused needs every param on CUDA.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=True)


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    """LETS' ``warmup_lr_ratio``: warmup = ratio × total optimizer steps (rounded up, so any ratio > 0
    warms up for at least one step)."""
    return math.ceil(cfg.warmup_ratio * total_steps)


def build_lr_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer,
                       total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``get_scheduler``, the same functions kohya and the diffusers examples use."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.name, optimizer=optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps, num_cycles=cfg.num_cycles, power=cfg.power)
