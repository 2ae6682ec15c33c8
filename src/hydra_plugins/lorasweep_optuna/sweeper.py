"""The Hydra ``Sweeper`` plugin; the work is done by :mod:`lorasweep.sweeping._controller`."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.lorasweep_optuna.config import LorasweepOptunaConf  # noqa: F401  (registers the config)


class LorasweepOptunaSweeper(Sweeper):
    """``hydra/sweeper=lorasweep_optuna``: an Optuna-5 study with async slots, pruning, a failure budget
    and resume."""

    def __init__(self, **conf: Any) -> None:
        self.conf = conf
        self.controller: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        import sys

        from lorasweep.app import report_user_error
        from lorasweep.errors import UserError
        from lorasweep.sweeping._controller import SweepController

        try:
            self.controller = SweepController(self.conf, hydra_context=hydra_context, task_function=task_function,
                                              config=config)
        except UserError as exc:
            sys.exit(report_user_error(exc))

    def sweep(self, arguments: list[str]) -> Any:
        """Run the sweep. A user mistake ends the process with one paragraph and exit code 2, a sweep stopped by
        its failure budget with exit code 1 (Hydra would print a traceback for either)."""
        import sys

        from lorasweep.app import report_user_error
        from lorasweep.errors import UserError
        from lorasweep.sweeping._controller import SweepStopped

        try:
            return self.controller.sweep(arguments)
        except UserError as exc:
            sys.exit(report_user_error(exc))
        except SweepStopped as exc:
            print(f"lorasweep: the sweep stopped early: {exc}.", file=sys.stderr)
            sys.exit(1)
