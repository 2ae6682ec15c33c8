"""Run Hydra jobs in separate Python processes and bring their ``JobReturn`` back (see the
``lorasweep_process`` launcher). The job, its Hydra context and the task function travel with cloudpickle
through a file in the sweep folder; the result comes back the same way.

A :class:`Worker` is one such process that runs jobs one after another: imports (≈10 s of torch,
diffusers, transformers and peft) and the process-level model cache outlive a job, so a sweep's later trials
start training at once. A job that kills its process (a segfault, the OOM killer, ``os._exit``) fails alone;
the next job gets a fresh worker.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import cloudpickle
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

_REPLY_FD_ENV = "LORASWEEP_WORKER_REPLY_FD"


class TrialProcessError(RuntimeError):
    """The job's process ended without a result (killed, crashed in the interpreter, timed out)."""


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the controller dies (Linux only; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    """A child process that runs jobs on request: a line ``<job file>\\t<result file>`` on its stdin, the
    reply ``done`` on a private pipe once the result file is written. Closing stdin ends it."""

    def __init__(self, device: str | None = None) -> None:
        """``device``: the one GPU this process may see (``CUDA_VISIBLE_DEVICES``), for its whole life: CUDA
        reads the variable once, when the process first touches the GPU."""
        reply_read, reply_write = os.pipe()
        env = {**os.environ, _REPLY_FD_ENV: str(reply_write)}
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        self.device = device
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.process = subprocess.Popen([sys.executable, "-m", "lorasweep.sweeping._process"], stdin=subprocess.PIPE,
                                        pass_fds=(reply_write,), preexec_fn=preexec, env=env)
        os.close(reply_write)
        self._reply: IO[bytes] = os.fdopen(reply_read, "rb", buffering=0)
        self.jobs_run = 0

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, job_file: Path, result_file: Path, timeout: float | None) -> None:
        """Run one job; returns when its result file exists or the process has ended (then it is gone)."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(f"{job_file}\t{result_file}\n".encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            self.process.wait()
            return
        self.jobs_run += 1
        try:
            ready, _, _ = select.select([self._reply], [], [], timeout)
        except BaseException:
            self.kill()
            raise
        if not ready:
            self.kill()
            raise subprocess.TimeoutExpired(self.process.args, timeout or 0.0)
        if self._reply.readline().strip() != b"done":  # EOF: the process ended mid-job
            self.process.wait()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._reply.close()

    def close(self) -> None:
        """Ask the worker to exit (end of input) and wait for it; kill it if it does not go within 30 s."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reply.close()


def run_in_process(hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction,
                   overrides: list[str], job_num: int, *, timeout: float | None = None,
                   worker: Worker | None = None) -> JobReturn:
    """Run one job in ``worker`` (or a fresh worker that ends with the job) and return its ``JobReturn``."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    own = worker is None
    worker = worker or Worker()
    try:
        with private_folder(sweep_dir, f"job-{job_num}") as tmp:
            job_file, result_file = tmp / "job.pkl", tmp / "result.pkl"
            job_file.write_bytes(job_payload(hydra_context, config, task_function, overrides, job_num))
            try:
                worker.run(job_file, result_file, timeout)
            except subprocess.TimeoutExpired:
                return failed_return(overrides, TrialProcessError(f"job {job_num} ran longer than "
                                                            f"hydra.launcher.timeout={timeout} s and was killed"))
            if result_file.is_file():
                check_private(result_file.parent)
                return load_return(result_file.read_bytes())
            code = worker.process.wait()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code} without a result"
            return failed_return(overrides, TrialProcessError(f"the process of job {job_num} {how}"))
    finally:
        if own and worker.alive:
            worker.close()


@contextlib.contextmanager
def private_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A temporary folder under ``parent`` that only this user can enter (``mkdtemp``: mode 0700), removed
    afterwards. Job and result files are pickles, which can run code when read, so they are only ever read
    from such a folder: on a shared file system nobody else can plant or swap one."""
    with tempfile.TemporaryDirectory(prefix=f".{prefix}-", dir=parent) as tmp:
        folder = Path(tmp)
        check_private(folder)
        yield folder


def check_private(folder: Path) -> None:
    """Refuse a job folder another user owns or could write to."""
    info = folder.stat()
    if (hasattr(os, "getuid") and info.st_uid != os.getuid()) or info.st_mode & 0o077:
        raise TrialProcessError(f"{folder} is not private to this user (mode {info.st_mode & 0o777:o}); job files "
                                "are only read from a folder nobody else can write")


def failed_return(overrides: list[str], error: BaseException) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret._return_value = error
    return ret


def job_payload(hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction,
                overrides: list[str], job_num: int) -> bytes:
    """Everything a job needs in another process (Hydra's context and singletons, the task), pickled."""
    return cloudpickle.dumps({"hydra_context": hydra_context, "config": config, "task_function": task_function,
                              "overrides": overrides, "job_num": job_num, "singleton_state": Singleton.get_state()})


def run_payload(payload: bytes) -> bytes:
    """Run the job of :func:`job_payload` in this process and return its pickled ``JobReturn`` (an unpicklable
    return value or exception is replaced by its text)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job, setup_globals
    from omegaconf import open_dict

    job: dict[str, Any] = cloudpickle.loads(payload)
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
        return cloudpickle.dumps(ret)
    except Exception as exc:  # an unpicklable return value or exception: keep its text
        ret._return_value = RuntimeError(f"{type(ret._return_value).__name__}: {ret._return_value} ({exc})")
        return cloudpickle.dumps(ret)


def load_return(data: bytes) -> JobReturn:
    ret = cloudpickle.loads(data)
    assert isinstance(ret, JobReturn)
    return ret


def _run_job_file(job_file: Path, result_file: Path) -> None:
    check_private(job_file.parent)
    data = run_payload(job_file.read_bytes())
    tmp = result_file.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(result_file)


def _serve() -> None:
    """The worker's loop: one job per stdin line until stdin closes."""
    with os.fdopen(int(os.environ.pop(_REPLY_FD_ENV)), "wb", buffering=0) as reply:
        for line in sys.stdin:
            job_file, _, result_file = line.rstrip("\n").partition("\t")
            _run_job_file(Path(job_file), Path(result_file))
            reply.write(b"done\n")


if __name__ == "__main__":
    _serve()
