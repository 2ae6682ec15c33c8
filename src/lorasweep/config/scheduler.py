"""The ``scheduler`` group: the learning-rate schedule (diffusers' ``get_scheduler``)."""

from __future__ import annotations

from dataclasses import dataclass

from lorasweep.config._checks import check_choice, check_range

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class SchedulerConfig:
    """LR schedule. kohya: ``--lr_scheduler``, ``--lr_warmup_steps``, ``--lr_scheduler_num_cycles``,
    ``--lr_scheduler_power``."""

    name: str = "constant"
    """``constant``, ``constant_with_warmup``, ``linear``, ``cosine``, ``cosine_with_restarts`` or
    ``polynomial`` (not "step"/"plateau")."""

    warmup_ratio: float = 0.0
    """Warmup steps as a fraction of the total optimizer steps (LETS: ``warmup_lr_ratio``)."""

    num_cycles: int = 1
    """Number of hard restarts of ``cosine_with_restarts``."""

    power: float = 1.0
    """Power of the ``polynomial`` decay (1 = linear)."""

    def validate(self, key: str = "scheduler") -> None:
        check_choice(f"{key}.name", self.name, SCHEDULERS)
        check_range(f"{key}.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_inclusive=False)
        check_range(f"{key}.num_cycles", self.num_cycles, low=1)
        check_range(f"{key}.power", self.power, low=0.0, low_inclusive=False)
