"""The validation loss per timestep (``val_loss/t<t>``) and its mean, and the validation keys' checks."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from lorasweep.config.validation import ValidationConfig
from lorasweep.errors import UserError
from lorasweep.evaluation.validation import ValidationLoss


class _Unet(torch.nn.Module):
    """Predicts a fixed function of its input and timestep, so each timestep has its own error."""

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=noisy * 0.5 + t.view(-1, 1, 1, 1) / 1000 + states.mean())


def test_per_timestep_means_and_their_average() -> None:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 8, 8, generator=g) for _ in range(3)] + [torch.randn(4, 8, 6, generator=g)]  # 2 buckets
    ids = torch.zeros(4, 5, dtype=torch.long)
    timesteps = [200, 400, 600, 800]
    loss = ValidationLoss(latents, ids, timesteps, repeats=2, seed=1, noise_scheduler=scheduler, batch_size=5)
    scores = loss.scores(_Unet(), torch.nn.Identity(), lambda te, x: torch.zeros(x.shape[0], 5, 3),
                         contextlib.nullcontext)

    by_t: dict[int, list[float]] = {t: [] for t in timesteps}
    states = torch.zeros(4, 5, 3)
    for group in loss.groups:  # by hand, pair by pair
        for i in range(group["noise"].shape[0]):
            t = group["timesteps"][i : i + 1]
            x0 = group["latents"][group["image_idx"][i]][None]
            noisy = scheduler.add_noise(x0, group["noise"][i : i + 1], t)
            pred = _Unet()(noisy, t, states[:1]).sample
            by_t[int(t)].append(float(((pred - group["noise"][i : i + 1]) ** 2).mean()))
    assert sorted(scores.per_timestep) == timesteps
    for t in timesteps:
        assert len(by_t[t]) == 4 * 2  # every timestep: all images × repeats
        assert scores.per_timestep[t] == pytest.approx(sum(by_t[t]) / len(by_t[t]), rel=1e-6)
    assert scores.mean == pytest.approx(sum(scores.per_timestep.values()) / 4, rel=1e-12)
    assert len(set(scores.per_timestep.values())) == 4
    assert scores.metrics() == {"val_loss": scores.mean, "val_loss/t200": scores.per_timestep[200],
                                "val_loss/t400": scores.per_timestep[400], "val_loss/t600": scores.per_timestep[600],
                                "val_loss/t800": scores.per_timestep[800]}
    assert loss(_Unet(), torch.nn.Identity(), lambda te, x: torch.zeros(x.shape[0], 5, 3),
                contextlib.nullcontext) == scores.mean


def test_default_timesteps_are_kohyas() -> None:
    assert ValidationConfig().timesteps == [200, 400, 600, 800]


@pytest.mark.parametrize(("timesteps", "fragment"), [([], "is empty"), ([200, 200], "repeats a timestep"),
                                                     ([1000], "out of range")])
def test_bad_timesteps_are_refused(timesteps: list[int], fragment: str) -> None:
    with pytest.raises(UserError, match=r"validation\.timesteps") as info:
        ValidationConfig(timesteps=timesteps).validate()
    assert fragment in str(info.value)
