"""The deterministic validation loss: the objective every run reports and every sweep optimises.

Held-out images, fixed timesteps, fixed noise drawn from ``validation.seed`` on the CPU (so CPU and CUDA
runs measure the same thing), eval mode, no grad. Nothing here depends on ``training.seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F

from lorasweep.models.text import encode_tokens


class ValidationLoss:
    """Precomputes every (image, timestep, noise) triple once; each call is a pure function of the weights."""

    def __init__(self, latents: torch.Tensor, input_ids: torch.Tensor, timesteps: list[int], repeats: int,
                 seed: int, noise_scheduler: Any, batch_size: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        n = latents.shape[0]
        image_idx, steps = [], []
        for i in range(n):
            for t in timesteps:
                for _ in range(repeats):
                    image_idx.append(i)
                    steps.append(t)
        self.image_idx = torch.tensor(image_idx)
        self.timesteps = torch.tensor(steps, dtype=torch.long)
        self.noise = torch.randn((len(image_idx), *latents.shape[1:]), generator=generator)
        self.latents = latents
        self.input_ids = input_ids
        self.noise_scheduler = noise_scheduler
        self.batch_size = batch_size

    def to(self, device: torch.device) -> ValidationLoss:
        for name in ("image_idx", "timesteps", "noise", "latents", "input_ids"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def __call__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, clip_skip: int,
                 autocast: Callable[[], AbstractContextManager[None]]) -> float:
        was_training = (unet.training, text_encoder.training)
        unet.eval()
        text_encoder.eval()
        try:
            with autocast():
                states = encode_tokens(text_encoder, self.input_ids, clip_skip)
                total = torch.zeros((), dtype=torch.float64, device=self.noise.device)
                for start in range(0, self.noise.shape[0], self.batch_size):
                    sl = slice(start, start + self.batch_size)
                    idx, t, noise = self.image_idx[sl], self.timesteps[sl], self.noise[sl]
                    noisy = self.noise_scheduler.add_noise(self.latents[idx], noise, t)
                    pred = unet(noisy, t, states[idx]).sample
                    per_item = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
                    total += per_item.double().sum()
            return float(total.item() / self.noise.shape[0])
        finally:
            unet.train(was_training[0])
            text_encoder.train(was_training[1])
