"""Session-wide fixtures: the tiny model and one trained run are built once and shared by every test."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_RUN_ID", None)

REPO = Path(__file__).resolve().parent.parent
ALL_CORES = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (``-n N``, the default in pyproject) worker i keeps its own share of the cores, and so
    do the trial processes and servers it starts: on a 2-core machine each worker is a 1-core machine, whose
    torch and lorasweep (which count cores from the CPU affinity) use one thread. Two workers that each run
    2-thread torch on 2 shared cores spin-wait in OpenMP and run many times slower than one."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or len(ALL_CORES) < 2:
        return
    cores = sorted(ALL_CORES)[int(worker.removeprefix("gw")) % int(count)::int(count)]
    if cores:
        os.sched_setaffinity(0, cores)


_pin_xdist_worker()


@contextlib.contextmanager
def all_cores() -> Iterator[None]:
    """Every core for this block (the one-time build of the tiny model, which the other workers wait for)."""
    if not ALL_CORES or os.sched_getaffinity(0) == ALL_CORES:
        yield
        return
    import torch

    mine, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, ALL_CORES)
    torch.set_num_threads(len(ALL_CORES))
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(threads)
LORASWEEP = [sys.executable, "-m", "lorasweep.cli"]

# Small but real runs: enough steps for the validation loss to fall, few enough for CI.
FAST = ["training.max_steps=40", "validation.every_n_steps=20", "sampling.every_n_steps=20",
        "sampling.num_inference_steps=4", "sampling.seeds=[0]"]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model/data cache, one for all xdist workers (its builds are file-locked). Set LORASWEEP_TEST_CACHE to
    keep it between local test sessions."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' common base folder
    path = Path(os.environ.get("LORASWEEP_TEST_CACHE") or shared / "shared-cache")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["LORASWEEP_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Toy-sized models run fastest on one thread and do not slow down when other work shares the cores
    (two OpenMP threads on busy cores spin-wait: measured 30 ms vs 0.2-2 s per tiny UNet forward). Modules
    opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``; restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def untrained_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny SD-1.x model after one step per phase (the builder's minimum, ~3 s): the real
    architecture and files, for tests of loading and file formats that need no trained weights."""
    from lorasweep.models.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("untrained-tiny") / "model"
    build_tiny_model(folder, vae_steps=1, unet_steps=1, text_steps=1)
    return folder


@pytest.fixture(scope="session")
def tiny_model(cache_dir: Path) -> Path:
    from lorasweep.models.tiny import ensure_tiny_model

    with all_cores():
        return ensure_tiny_model(cache_dir)


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``lorasweep`` in a fresh process, as a user would."""
    return subprocess.run([*LORASWEEP, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def main_in(cwd: Path, args: list[str]) -> int:
    """Run the CLI's entry point in the test process from ``cwd``: the same code path as ``lorasweep`` without
    a new interpreter's ≈10 s of imports. Tests of process-level behaviour (exit paths, workers, resume in a
    fresh process) use :func:`run_cli`."""
    from lorasweep.cli import main

    cwd.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(cwd):
        return main(args)


def cli_in(cwd: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """:func:`main_in` with :func:`run_cli`'s result: exit code and captured output, ``env`` set for the call.
    For sweeps whose trials run in the controller (``hydra/launcher=basic``) and that test no process-level
    behaviour; those use :func:`run_cli`."""
    out, err = io.StringIO(), io.StringIO()
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main_in(cwd, args)
            except SystemExit as exit:  # Hydra's multirun path exits instead of returning
                code = 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(["lorasweep", *args], code, out.getvalue(), err.getvalue())


def user_error_line(returncode: int, stderr: str, *fragments: str) -> str:
    """Assert bad input's contract: exit code 2, no traceback, exactly one ``lorasweep: error:`` paragraph that
    contains every fragment; return that line."""
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("lorasweep: error:")]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def trained_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One `lorasweep train` run on the embedded default (in the test process), shared by the run-folder,
    MLflow, export and reproduce tests; `reproduce` re-runs it in a fresh process."""
    work = tmp_path_factory.mktemp("trained")
    proc = cli_in(work, ["train", *FAST])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = sorted((work / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    return {"work": work, "run_dir": runs[0], "stdout": proc.stdout, "stderr": proc.stderr}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store and artifact root under ``root``; it can
    be stopped and started again on the same port and store (a server that goes away and comes back)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
               f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        # The server's GenAI job runners are a handful of busy processes; a tracking server needs none.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("mlflow server did not start:\n" + (self.root / "server.log").read_text())
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server and every process it started (its session)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on a free 127.0.0.1 port with its own sqlite store and artifact root."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    finally:
        server.stop()
