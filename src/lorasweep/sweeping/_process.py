"""Run one Hydra job in a fresh Python process and bring its ``JobReturn`` back (see the
``lorasweep_process`` launcher). The job, its Hydra context and the task function travel with cloudpickle
through a file in the sweep folder; the result comes back the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import cloudpickle
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class TrialProcessError(RuntimeError):
    """The job's process ended without a result (killed, crashed in the interpreter, timed out)."""


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the controller dies (Linux only; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_in_process(hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction,
                   overrides: list[str], job_num: int, *, timeout: float | None = None) -> JobReturn:
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".job-{job_num}-", dir=sweep_dir) as tmp:
        job_file, result_file = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job_file.write_bytes(cloudpickle.dumps({
            "hydra_context": hydra_context, "config": config, "task_function": task_function,
            "overrides": overrides, "job_num": job_num, "singleton_state": Singleton.get_state()}))
        command = [sys.executable, "-m", "lorasweep.sweeping._process", str(job_file), str(result_file)]
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        process = subprocess.Popen(command, preexec_fn=preexec, env=os.environ.copy())
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return _failed(overrides, TrialProcessError(f"job {job_num} ran longer than "
                                                        f"hydra.launcher.timeout={timeout} s and was killed"))
        except BaseException:
            process.kill()
            process.wait()
            raise
        if result_file.is_file():
            ret = cloudpickle.loads(result_file.read_bytes())
            assert isinstance(ret, JobReturn)
            return ret
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code} without a result"
        return _failed(overrides, TrialProcessError(f"the process of job {job_num} {how}"))


def _failed(overrides: list[str], error: BaseException) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret._return_value = error
    return ret


def _child(job_file: Path, result_file: Path) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job, setup_globals
    from omegaconf import open_dict

    job: dict[str, Any] = cloudpickle.loads(job_file.read_bytes())
    setup_globals()
    Singleton.set_state(job["singleton_state"])
    hydra_context: HydraContext = job["hydra_context"]
    config = hydra_context.config_loader.load_sweep_config(job["config"], list(job["overrides"]))
    with open_dict(config):
        config.hydra.job.id = f"{config.hydra.job.name}_{job['job_num']}"
        config.hydra.job.num = job["job_num"]
    HydraConfig.instance().set_config(config)
    ret = run_job(hydra_context=hydra_context, config=config, task_function=job["task_function"],
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    ret.hydra_cfg = None  # not needed by the sweeper, and large
    try:
        data = cloudpickle.dumps(ret)
    except Exception as exc:  # an unpicklable return value or exception: keep its text
        ret._return_value = RuntimeError(f"{type(ret._return_value).__name__}: {ret._return_value} ({exc})")
        data = cloudpickle.dumps(ret)
    tmp = result_file.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(result_file)


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
