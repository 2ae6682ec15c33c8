"""``hydra/launcher=lorasweep_process``: jobs in separate Python processes (the sweep presets' default).

Why: a trial that crashes, runs out of memory or is killed takes only itself down (joblib's loky pool
aborts sibling jobs when one worker dies, and a ProcessPoolExecutor breaks entirely); a trial process also
dies with its controller (Linux ``PR_SET_PDEATHSIG``), so a killed sweep leaves no orphans training on.
Each call to ``launch`` runs its jobs one after another; the sweeper's slots call it concurrently.

With ``devices`` (a list of GPU ids, or ``auto`` for every GPU this machine shows), each worker process
sees exactly one GPU (``CUDA_VISIBLE_DEVICES``), and no two jobs run on one GPU at once: one trial per GPU.
A job waits for a free GPU when the sweep has more slots than GPUs.

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

    devices: Any = None
    """One trial per GPU: the GPU ids to spread jobs over (``[0,1,2,3]``), or ``auto`` (those in
    ``CUDA_VISIBLE_DEVICES``, else every GPU ``nvidia-smi`` lists); each job's process sees only its own GPU.
    null = every process sees every GPU (one slot per machine, or CPU runs)."""


ConfigStore.instance().store(group="hydra/launcher", name="lorasweep_process", node=LorasweepProcessLauncherConf,
                             provider="lorasweep")


class LorasweepProcessLauncher(Launcher):
    def __init__(self, timeout: float | None = None, reuse_workers: bool = True,
                 max_jobs_per_worker: int | None = None, devices: Any = None) -> None:
        self.timeout = timeout
        self.reuse_workers = reuse_workers
        self.max_jobs_per_worker = max_jobs_per_worker
        self.devices = devices
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self._idle: list[Any] = []
        self._free_devices: list[str | None] | None = None
        self._lock = threading.Condition()
        atexit.register(self.close)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from lorasweep.sweeping.devices import resolve_devices

        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
        ids = resolve_devices(self.devices)
        self._free_devices = None if ids is None else list(ids)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from lorasweep.sweeping._process import run_in_process

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        returns = []
        for i, overrides in enumerate(job_overrides):
            worker = self._take()
            try:
                returns.append(run_in_process(self.hydra_context, self.config, self.task_function, list(overrides),
                                              initial_job_idx + i, timeout=self.timeout, worker=worker))
            finally:
                self._give_back(worker)
        return returns

    def _take(self) -> Any:
        """An idle worker (with its GPU), or a new one on a free GPU; waits while every GPU is busy."""
        from lorasweep.sweeping._process import Worker

        with self._lock:
            while True:
                while self.reuse_workers and self._idle:
                    worker = self._idle.pop()
                    if worker.alive:
                        return worker
                    self._release(worker.device)
                if self._free_devices is None:
                    device = None
                    break
                if self._free_devices:
                    device = self._free_devices.pop(0)
                    break
                self._lock.wait()
        return Worker(device)

    def _release(self, device: str | None) -> None:
        if self._free_devices is not None and device is not None:
            self._free_devices.append(device)
            self._lock.notify_all()

    def _give_back(self, worker: Any) -> None:
        """A worker that lives on stays bound to its GPU while idle; a closed or dead one frees it."""
        keep = self.reuse_workers and worker.alive and (
            self.max_jobs_per_worker is None or worker.jobs_run < self.max_jobs_per_worker)
        if not keep and worker.alive:
            worker.close()
        with self._lock:
            if keep:
                self._idle.append(worker)
            else:
                self._release(worker.device)
            self._lock.notify_all()

    def close(self) -> None:
        """End the idle workers (the sweeper calls it when the sweep ends; also at interpreter exit)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()

    def __getstate__(self) -> Any:  # the sweeper's slots may be pickled with it; the task travels separately
        return {"timeout": self.timeout, "reuse_workers": self.reuse_workers,
                "max_jobs_per_worker": self.max_jobs_per_worker, "devices": self.devices}

    def __setstate__(self, state: Any) -> None:
        self.__init__(**state)
