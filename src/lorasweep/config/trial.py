"""The ``trial`` node: how a sweep trial reaches its Optuna study. Set by the sweeper, not by users."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorasweep.config._checks import check_range


@dataclass
class TrialConfig:
    """Filled in by ``hydra/sweeper=lorasweep_optuna`` for each trial it launches; empty in single runs and
    grid sweeps. With it the job reports the validation loss to its trial at every evaluation and stops when
    the pruner says so. ``lorasweep reproduce`` clears it: a reproduction is a plain run."""

    study_name: str | None = None
    """The Optuna study of the sweep."""

    storage: str | None = None
    """The study's storage: ``journal:///abs/path`` or an RDB URL."""

    number: int | None = None
    """This trial's number in the study (also ``hydra.job.num`` and the run folder's name)."""

    pruner: str = "none"
    """The sweeper's pruner, rebuilt here: Optuna does not store the pruner in the study."""

    pruner_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the pruner."""

    objectives: list[str] = field(default_factory=lambda: ["val_loss"])
    """The metrics the sweep optimises; the first is reported for pruning when it is ``val_loss``."""

    num_threads: int | None = None
    """Torch CPU threads for this trial. null: in a sweep, the cores this process may use divided among its
    parallel slots; in a single run, torch's default. Set it when several controllers share a machine (each
    only knows its own slots, and oversubscribed OpenMP threads spin-wait)."""

    @property
    def active(self) -> bool:
        return self.study_name is not None and self.number is not None

    def validate(self, key: str = "trial") -> None:
        if self.num_threads is not None:
            check_range(f"{key}.num_threads", self.num_threads, low=1)
        if (self.study_name is None) != (self.number is None) or (self.study_name and not self.storage):
            from lorasweep.errors import UserError

            raise UserError(key, "study_name, storage and number must be given together.",
                            "This node is set by the lorasweep Optuna sweeper; leave it empty in your runs.")
