"""``hydra/launcher=lorasweep_process``: each job in a fresh Python process (the sweep presets' default).

Why: a trial that crashes, runs out of memory or is killed takes only itself down (joblib's loky pool
aborts sibling jobs when one worker dies, and a ProcessPoolExecutor breaks entirely); a trial process also
dies with its controller (Linux ``PR_SET_PDEATHSIG``), so a killed sweep leaves no orphans training on.
Each call to ``launch`` runs its jobs one after another; the sweeper's slots call it concurrently.

No ``from __future__ import annotations``: Hydra's plugin scan executes this module outside ``sys.modules``.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@dataclass
class LorasweepProcessLauncherConf:
    _target_: str = "hydra_plugins.lorasweep_optuna.process_launcher.LorasweepProcessLauncher"

    timeout: float | None = None
    """Seconds after which a job's process is killed and the job fails (null = no limit)."""


ConfigStore.instance().store(group="hydra/launcher", name="lorasweep_process", node=LorasweepProcessLauncherConf,
                             provider="lorasweep")


class LorasweepProcessLauncher(Launcher):
    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from lorasweep.sweeping._process import run_in_process

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        return [run_in_process(self.hydra_context, self.config, self.task_function, list(overrides),
                               initial_job_idx + i, timeout=self.timeout)
                for i, overrides in enumerate(job_overrides)]

    def __getstate__(self) -> Any:  # the sweeper's slots may be pickled with it; the task travels separately
        return {"timeout": self.timeout}
