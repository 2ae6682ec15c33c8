"""The ``scheduler`` group: the learning-rate schedule (diffusers' ``get_scheduler``, as kohya uses it).

Every schedule multiplies each parameter group's own lr by the same factor f(s), s = optimizer steps done
(the step from s to s+1 uses f(s), so a warmup's first step has lr 0). With W warmup and T total steps,
p = (s - W) / (T - W):

- ``constant``: f = 1. It has no warmup: ``warmup_ratio`` is ignored, as in kohya and diffusers (choose
  ``constant_with_warmup`` for one). It is not refused, so search spaces mixing schedules keep one ratio.
- ``constant_with_warmup``: s / W during warmup, then 1.
- ``linear``: warmup, then 1 - p.
- ``cosine``: warmup, then 0.5 (1 + cos(pi p)), one half cosine to 0 (``num_cycles`` is not read).
- ``cosine_with_restarts``: warmup, then 0.5 (1 + cos(pi ((num_cycles p) mod 1))): ``num_cycles`` half
  cosines, each restarting from the full lr; 0 at the end.
- ``polynomial``: warmup, then ((lr - lr_end) (1 - p)^power + lr_end) / lr with lr = ``optimizer.lr`` and
  diffusers' fixed ``lr_end`` = 1e-7 (:data:`POLYNOMIAL_LR_END`): the base group decays to 1e-7 exactly, a
  group with its own lr to its lr × 1e-7 / ``optimizer.lr``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasweep.config._checks import check_choice, check_range

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
POLYNOMIAL_LR_END = 1e-7
"""diffusers' ``get_polynomial_decay_schedule_with_warmup`` default, which ``get_scheduler`` always uses."""


@dataclass
class SchedulerConfig:
    """LR schedule. kohya: ``--lr_scheduler``, ``--lr_warmup_steps``, ``--lr_scheduler_num_cycles``,
    ``--lr_scheduler_power``. Presets: ``scheduler=<name>``."""

    name: str = "constant"
    """``constant``, ``constant_with_warmup``, ``linear``, ``cosine``, ``cosine_with_restarts`` or
    ``polynomial`` (not "step"/"plateau"). ``constant`` ignores ``warmup_ratio``, as kohya does."""

    warmup_ratio: float = 0.0
    """Warmup steps as a fraction of the total optimizer steps (LETS: ``warmup_lr_ratio``): ceil(ratio ×
    total) steps of linear increase from 0, at most total - 1 so that training reaches the full lr."""

    num_cycles: int = 1
    """Number of cosine cycles (hard restarts) of ``cosine_with_restarts``; no other schedule reads it."""

    power: float = 1.0
    """Power of the ``polynomial`` decay to lr_end = 1e-7 (1 = linear, > 1 drops faster early); no other
    schedule reads it."""

    def validate(self, key: str = "scheduler") -> None:
        check_choice(f"{key}.name", self.name, SCHEDULERS)
        check_range(f"{key}.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_inclusive=False)
        check_range(f"{key}.num_cycles", self.num_cycles, low=1)
        check_range(f"{key}.power", self.power, low=0.0, low_inclusive=False)
