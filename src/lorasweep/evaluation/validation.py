"""The deterministic validation loss: the objective every run reports and every sweep optimises.

Held-out images, fixed timesteps, fixed noise drawn from ``validation.seed`` on the CPU (so CPU and CUDA
runs measure the same thing), eval mode, no grad. Nothing here depends on ``training.seed``. With aspect-ratio
buckets the held-out latents differ in shape; they are evaluated shape by shape and averaged per sample.

It is plain MSE against the base model's own noise schedule whatever the training objective
(``training.loss_type``, min-SNR weights, noise offsets, zero terminal SNR): one yardstick, so runs that differ
in those knobs stay comparable. Every timestep gets the same number of (image, noise) pairs, so the overall
mean is the mean of the per-timestep means (``val_loss/t200`` …, kohya logs the same split).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from lorasweep.config.validation import timestep_metric
from lorasweep.training.objective import per_sample_mse, training_target

Encode = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
"""(text encoder, token ids) → hidden states, with the run's clip_skip and token length."""


@dataclass(frozen=True)
class ValidationScores:
    """One evaluation: the mean loss and the mean at each validation timestep."""

    mean: float
    per_timestep: dict[int, float]

    def metrics(self) -> dict[str, float]:
        """``val_loss`` and ``val_loss/t<timestep>`` for each timestep: the names runs log and sweeps optimise."""
        return {"val_loss": self.mean, **{timestep_metric(t): v for t, v in self.per_timestep.items()}}


class ValidationLoss:
    """Precomputes every (image, timestep, noise) triple once; each call is a pure function of the weights."""

    def __init__(self, latents: list[torch.Tensor], input_ids: torch.Tensor, timesteps: list[int], repeats: int,
                 seed: int, noise_scheduler: Any, batch_size: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.groups: list[dict[str, torch.Tensor]] = []
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, latent in enumerate(latents):
            by_shape.setdefault(tuple(latent.shape), []).append(i)
        for shape, members in by_shape.items():
            image_idx = [i for i in members for _ in timesteps for _ in range(repeats)]
            steps = [t for _ in members for t in timesteps for _ in range(repeats)]
            self.groups.append({
                "latents": torch.stack([latents[i] for i in members]),
                "image_idx": torch.tensor([members.index(i) for i in image_idx]),
                "ids_idx": torch.tensor(image_idx),
                "timesteps": torch.tensor(steps, dtype=torch.long),
                "noise": torch.randn((len(image_idx), *shape), generator=generator),
            })
        self.count = sum(len(g["timesteps"]) for g in self.groups)
        self.timesteps = list(dict.fromkeys(timesteps))
        self.input_ids = input_ids
        self.noise_scheduler = noise_scheduler
        self.batch_size = batch_size

    def to(self, device: torch.device) -> ValidationLoss:
        self.groups = [{k: v.to(device) for k, v in group.items()} for group in self.groups]
        self.input_ids = self.input_ids.to(device)
        return self

    def __call__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, encode: Encode,
                 autocast: Callable[[], AbstractContextManager[None]], *, states: torch.Tensor | None = None) -> float:
        """The mean loss over every precomputed triple (see :meth:`scores`)."""
        return self.scores(unet, text_encoder, encode, autocast, states=states).mean

    @torch.no_grad()
    def scores(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, encode: Encode,
               autocast: Callable[[], AbstractContextManager[None]], *,
               states: torch.Tensor | None = None) -> ValidationScores:
        """The mean loss over every precomputed triple, and per timestep. ``states``: the captions' hidden states
        when the text encoder is frozen (computed once by the caller); else they are encoded here, in eval mode."""
        was_training = (unet.training, text_encoder.training)
        unet.eval()
        text_encoder.eval()
        device = self.input_ids.device
        slot = torch.full((max(self.timesteps) + 1,), -1, dtype=torch.long)
        slot[self.timesteps] = torch.arange(len(self.timesteps))
        slot = slot.to(device)
        try:
            with autocast():
                if states is None:
                    states = encode(text_encoder, self.input_ids)
                sums = torch.zeros(len(self.timesteps), dtype=torch.float64, device=device)
                counts = torch.zeros(len(self.timesteps), dtype=torch.float64, device=device)
                for group in self.groups:
                    for start in range(0, group["noise"].shape[0], self.batch_size):
                        sl = slice(start, start + self.batch_size)
                        t, noise = group["timesteps"][sl], group["noise"][sl]
                        latents = group["latents"][group["image_idx"][sl]]
                        noisy = self.noise_scheduler.add_noise(latents, noise, t)
                        pred = unet(noisy, t, states[group["ids_idx"][sl]]).sample
                        target = training_target(self.noise_scheduler, latents, noise, t)
                        # A one-hot sum, not index_add_ (atomic adds on CUDA would make the value vary).
                        which = torch.nn.functional.one_hot(slot[t], len(self.timesteps)).double()
                        sums += (which * per_sample_mse(pred, target).double()[:, None]).sum(0)
                        counts += which.sum(0)
            sums, counts = sums.cpu(), counts.cpu()  # the one host-device sync of an evaluation
            per_timestep = {t: float(sums[i] / counts[i]) for i, t in enumerate(self.timesteps)}
            return ValidationScores(float(sums.sum() / counts.sum()), per_timestep)
        finally:
            unet.train(was_training[0])
            text_encoder.train(was_training[1])
