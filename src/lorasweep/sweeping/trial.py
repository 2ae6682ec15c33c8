"""The job's side of a sweep trial: report intermediate values to the shared study, stop when pruned.

The controller and the trial run in different processes (or machines); they share only the storage. So the
job loads the study itself, rebuilds the pruner from config (Optuna does not store it), and talks to its
trial by number.
"""

from __future__ import annotations

import logging
from typing import Any

from lorasweep.config.trial import TrialConfig

log = logging.getLogger(__name__)


class TrialGone(RuntimeError):
    """The controller already finished this trial (e.g. a resumed sweep marked it FAIL): stop working on it."""


class TrialReporter:
    """Reports the sweep's objective (``val_loss`` or one timestep's ``val_loss/t<t>``) at each evaluation of a
    sweep trial and raises ``optuna.TrialPruned`` when the pruner says so."""

    def __init__(self, cfg: TrialConfig) -> None:
        import optuna

        from lorasweep.sweeping.factories import make_pruner
        from lorasweep.sweeping.storage import open_storage

        assert cfg.active and cfg.storage and cfg.study_name is not None and cfg.number is not None
        self.number = cfg.number
        storage = open_storage(cfg.storage, key="trial.storage")
        study = optuna.load_study(study_name=cfg.study_name, storage=storage,
                                  pruner=make_pruner(cfg.pruner, cfg.pruner_args))
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, cfg.number)
        self._trial = optuna.Trial(study, trial_id)
        from lorasweep.job import reported_while_running

        #: The metric the pruner watches: the sweep's one objective, when trials report it while they run.
        self._metric = cfg.objectives[0] if len(cfg.objectives) == 1 and reported_while_running(
            cfg.objectives[0]) else None

    def set_attrs(self, **attrs: Any) -> None:
        """Cross-links on the Optuna trial (run folder, MLflow run id)."""
        for key, value in attrs.items():
            self._call(self._trial.set_user_attr, key, value)

    def report(self, step: int, values: dict[str, float]) -> None:
        """Called with every metrics row; acts on the validation loss after step 0."""
        import optuna

        metric = self._metric
        if metric is None or metric not in values or step == 0:
            return
        self._call(self._trial.report, values[metric], step)
        if bool(self._trial.should_prune()):  # may be a numpy bool
            log.info("trial %d pruned at step %d (%s %.6f)", self.number, step, metric, values[metric])
            raise optuna.TrialPruned(f"pruned at step {step} with {metric} {values[metric]:.6f}")

    def _call(self, method: Any, *args: Any) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            method(*args)
        except UpdateFinishedTrialError:
            raise TrialGone(f"trial {self.number} was already finished by its sweep controller") from None
