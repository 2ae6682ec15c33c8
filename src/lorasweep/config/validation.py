"""The ``validation`` group: the deterministic validation loss every trial is compared by."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorasweep.config._checks import check_range
from lorasweep.errors import UserError

TIMESTEP_METRIC_PREFIX = "val_loss/t"
"""Metric names of the per-timestep validation losses (``val_loss/t200``...): runs log them, sweeps optimise
and prune on them. Here, not beside the evaluation code, so a sweeper can check an objective without torch."""


def timestep_metric(timestep: int) -> str:
    return f"{TIMESTEP_METRIC_PREFIX}{timestep}"


@dataclass
class ValidationConfig:
    """Held-out images, fixed timesteps and fixed noise: the same measurement for every run, so runs are
    comparable and a sweep's pruner sees a signal, not noise."""

    split: float = 0.25
    """Fraction of the training images held out (a seeded choice; never trained on). Regularisation images
    (``data.reg_dir``) are never held out. kohya: ``--validation_split``."""

    seed: int = 0
    """Seed of the split and of the validation noise; independent of ``training.seed``, so runs with different
    training seeds are measured on the same images and noise. kohya: ``--validation_seed``."""

    timesteps: list[int] = field(default_factory=lambda: [200, 400, 600, 800])
    """Fixed diffusion timesteps the loss is averaged over; each is also logged alone as ``val_loss/t<t>``
    (a sweep may optimise one: ``hydra.sweeper.objective=val_loss/t200``). The default is kohya's: four points
    evenly inside the timestep range. Low timesteps measure detail, high ones composition."""

    repeats: int = 2
    """Fixed noise draws per image and timestep (more = less variance, slower)."""

    every_n_steps: int | None = 50
    """Evaluation interval in optimizer steps (also at step 0 and at the end); null = start and end."""

    batch_size: int = 16
    """Batch size of the evaluation forward passes (does not change the value)."""

    def validate(self, key: str = "validation") -> None:
        check_range(f"{key}.split", self.split, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_range(f"{key}.seed", self.seed, low=0)
        if not self.timesteps:
            raise UserError(f"{key}.timesteps", "is empty.", "Give at least one timestep, e.g. [500].")
        for t in self.timesteps:
            check_range(f"{key}.timesteps", t, low=0, high=999)
        if len(set(self.timesteps)) != len(self.timesteps):
            raise UserError(f"{key}.timesteps", f"{list(self.timesteps)} repeats a timestep.",
                            "List each timestep once (validation.repeats sets how many noise draws each gets).")
        check_range(f"{key}.repeats", self.repeats, low=1)
        if self.every_n_steps is not None:
            check_range(f"{key}.every_n_steps", self.every_n_steps, low=1)
        check_range(f"{key}.batch_size", self.batch_size, low=1)
