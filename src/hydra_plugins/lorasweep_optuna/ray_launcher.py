"""``hydra/launcher=lorasweep_ray``: each job is a Ray task, on a local Ray instance or a Ray cluster.

Why our own: the released ``hydra-ray-launcher`` pins ``cloudpickle<3``, which breaks joblib ≥ 1.5 (the
``joblib`` launcher) in the same environment. This one is small: the job travels as the same payload the
``lorasweep_process`` launcher uses (Hydra's context, singletons and the task, pickled), Ray runs it in one
of its worker processes and returns the pickled ``JobReturn``.

* ``address``: null starts a local Ray instance (``init_args`` go to ``ray.init``, e.g. ``num_cpus``);
  ``auto`` joins the cluster this machine belongs to; ``ray://head:10001`` connects a client to one.
* ``num_cpus``/``num_gpus`` are what each trial reserves: with ``num_gpus=1`` Ray runs one trial per GPU and
  sets ``CUDA_VISIBLE_DEVICES`` for it. Ray reuses its worker processes, so later trials on a worker find the
  base model in the process cache.
* A trial whose process dies fails alone (Ray's task retries are off: a crash would rerun a whole trial).

The sweeper's slots call ``launch`` concurrently, one job per call; async slots, pruning and the failure
budget therefore behave as with the other launchers. Every job needs the sweep folder (``hydra.sweep.dir``)
and the data on a file system the Ray nodes share.

No ``from __future__ import annotations``: Hydra's plugin scan executes this module outside ``sys.modules``.
"""

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class LorasweepRayLauncherConf:
    _target_: str = "hydra_plugins.lorasweep_optuna.ray_launcher.LorasweepRayLauncher"

    address: str | None = None
    """null = start a local Ray instance; ``auto`` = the running cluster of this node; ``ray://host:10001``."""

    num_cpus: float = 1.0
    """CPUs each trial reserves (Ray schedules as many trials at once as the reservations allow)."""

    num_gpus: float = 0.0
    """GPUs each trial reserves; 1 = one trial per GPU (Ray sets ``CUDA_VISIBLE_DEVICES``)."""

    init_args: dict[str, Any] = field(default_factory=dict)
    """Extra ``ray.init`` arguments, e.g. ``{num_cpus: 8}`` for a local instance or a ``runtime_env``."""


ConfigStore.instance().store(group="hydra/launcher", name="lorasweep_ray", node=LorasweepRayLauncherConf,
                             provider="lorasweep")

_INIT_LOCK = threading.Lock()


class LorasweepRayLauncher(Launcher):
    def __init__(self, address: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 init_args: Any = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.init_args = dict(OmegaConf.to_container(init_args, resolve=True)) if isinstance(init_args, DictConfig) \
            else dict(init_args or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self._started_ray = False

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _ray(self) -> Any:
        import ray

        with _INIT_LOCK:
            if not ray.is_initialized():
                log.info("connecting to Ray at %s", self.address or "a new local instance")
                ray.init(address=self.address, **{"include_dashboard": False, **self.init_args})  # the user's wins
                self._started_ray = True
        return ray

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from lorasweep.sweeping._process import TrialProcessError, failed_return, job_payload, load_return

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        ray = self._ray()
        remote = ray.remote(_run_payload).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)
        refs = [(list(overrides), remote.remote(job_payload(self.hydra_context, self.config, self.task_function,
                                                            list(overrides), initial_job_idx + i)))
                for i, overrides in enumerate(job_overrides)]
        returns = []
        for overrides, ref in refs:
            try:
                returns.append(load_return(ray.get(ref)))
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.TaskCancelledError) as exc:
                returns.append(failed_return(overrides, TrialProcessError(
                    f"the Ray worker of the job died ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})")))
        return returns

    def close(self) -> None:
        """Shut down the local Ray instance this launcher started (the sweeper calls it at the end)."""
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def __getstate__(self) -> Any:
        return {"address": self.address, "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "init_args": self.init_args}

    def __setstate__(self, state: Any) -> None:
        self.__init__(**state)


def _run_payload(payload: bytes) -> bytes:
    from lorasweep.sweeping._process import run_payload

    return run_payload(payload)
