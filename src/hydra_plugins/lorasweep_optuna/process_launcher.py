"""``hydra/launcher=lorasweep_process``: jobs in separate Python processes (the sweep presets' default).

Why: a trial that crashes, runs out of memory or is killed takes only itself down (joblib's loky pool
aborts sibling jobs when one worker dies, and a ProcessPoolExecutor breaks entirely); a trial process also
dies with its controller (Linux ``PR_SET_PDEATHSIG``), so a killed sweep leaves no orphans training on.
Each call to ``launch`` runs its jobs one after another; the sweeper's slots call it concurrently.

Worker processes are reused (``reuse_workers``): a slot's next trial runs in the process its last one
ended in, with torch & co. imported and the base model loaded, so it starts training at once. Trials stay
independent: the model cache hands out the pristine base (LoRA removed, flags restored), and every run seeds
its own randomness.

No ``from __future__ import annotations``: Hydra's plugin scan executes this module outside ``sys.modules``.
"""

import atexit
import logging
import threading
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

    reuse_workers: bool = True
    """Run a slot's jobs one after another in one process (imports and the loaded base model are kept; later
    trials start at once). false: a fresh process per job, for code that leaks state between runs."""

    max_jobs_per_worker: int | None = None
    """Replace a worker after this many jobs (null = never), e.g. to bound memory fragmentation in very
    long sweeps."""


ConfigStore.instance().store(group="hydra/launcher", name="lorasweep_process", node=LorasweepProcessLauncherConf,
                             provider="lorasweep")


class LorasweepProcessLauncher(Launcher):
    def __init__(self, timeout: float | None = None, reuse_workers: bool = True,
                 max_jobs_per_worker: int | None = None) -> None:
        self.timeout = timeout
        self.reuse_workers = reuse_workers
        self.max_jobs_per_worker = max_jobs_per_worker
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        atexit.register(self.close)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from lorasweep.sweeping._process import run_in_process

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        returns = []
        for i, overrides in enumerate(job_overrides):
            worker = self._take() if self.reuse_workers else None
            try:
                returns.append(run_in_process(self.hydra_context, self.config, self.task_function, list(overrides),
                                              initial_job_idx + i, timeout=self.timeout, worker=worker))
            finally:
                if worker is not None:
                    self._give_back(worker)
        return returns

    def _take(self) -> Any:
        from lorasweep.sweeping._process import Worker

        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive:
                    return worker
        return Worker()

    def _give_back(self, worker: Any) -> None:
        if not worker.alive:
            return
        if self.max_jobs_per_worker is not None and worker.jobs_run >= self.max_jobs_per_worker:
            worker.close()
            return
        with self._lock:
            self._idle.append(worker)

    def close(self) -> None:
        """End the idle workers (the sweeper calls it when the sweep ends; also at interpreter exit)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()

    def __getstate__(self) -> Any:  # the sweeper's slots may be pickled with it; the task travels separately
        return {"timeout": self.timeout, "reuse_workers": self.reuse_workers,
                "max_jobs_per_worker": self.max_jobs_per_worker}

    def __setstate__(self, state: Any) -> None:
        self.__init__(**state)
