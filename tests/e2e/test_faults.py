"""Faults while a run trains: the MLflow server going away (and coming back, or not), the disk filling up
while a LoRA or a training state is written. Nothing is lost or overwritten, every run ends with the right
status. (Exceptions, non-finite losses, out-of-memory and killed controllers in sweeps: test_sweep_run.py;
SIGKILL mid-epoch and an exact resume: test_train_options.py.)"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.conftest import LORASWEEP, MlflowServer, main_in, user_error_line

QUIET = ["sampling.enabled=false", "validation.every_n_steps=null", "training.log_every_n_steps=1"]


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path.name}:\n"
                                 f"{out[-2000:]}{err[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.1)


def _only_run(work: Path) -> Path:
    (run,) = (work / "outputs" / "runs").iterdir()
    return run


def _logged_steps(run: Path, key: str) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if key in row]


def test_mlflow_server_going_away_mid_run(tiny_model: Path, tmp_path: Path) -> None:
    """The server stops at step 20, is back by step 40, and stops for good at step 60. The run trains on and
    completes its folder; what was queued in the first outage reaches MLflow once the server answers again
    (no gap); for the second, run.json and a warning name what never arrived, and the run's own status is
    FINISHED. The server's store keeps the run as the server last saw it (RUNNING)."""
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    try:
        _outage_run(server, tmp_path)
    finally:
        server.stop()


def _outage_run(server: MlflowServer, tmp_path: Path) -> None:
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    url = server.start()
    work = tmp_path / "work"
    work.mkdir()
    fault = ";".join(f"barrier:step={n}:dir={barriers}" for n in (20, 40, 60))
    proc = subprocess.Popen([*LORASWEEP, "train", *QUIET, "training.max_steps=80", f"tracking.uri={url}",
                             "tracking.retry_after_s=2"],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LORASWEEP_FAULT": fault})
    try:
        for step, action in ((20, server.stop), (40, server.start), (60, server.stop)):
            _wait_for(barriers / f"reached-{step}", proc)
            action()
            (barriers / f"go-{step}").touch()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "Traceback" not in err
    run = _only_run(work)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "FINISHED" and record["steps"] == 80
    assert _logged_steps(run, "loss") == list(range(1, 81))  # the folder has every step
    assert (run / "lora" / "lora.safetensors").is_file()
    tracking = record["tracking"]
    assert tracking["outages"] == 2 and tracking["complete"] is False and tracking["status_set"] is False
    assert tracking["unsent"]["metrics"] > 0 and tracking["unsent"]["artifacts"] > 0 and tracking["last_error"]
    warning = " ".join(err.split())  # the console wraps long lines
    assert "did not get everything of this run" in warning and "'tracking' lists the gap" in warning
    assert f"The run folder {run} is complete" in (run / "train.log").read_text()

    client = MlflowClient(tracking_uri=f"sqlite:///{server.root / 'mlflow.db'}")  # the server's own store
    mlflow_run = client.get_run(record["mlflow"]["run_id"])
    assert mlflow_run.info.status == "RUNNING"  # the end never reached it
    steps = sorted(m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss"))
    # The first outage healed: every step up to the second outage arrived, the ones queued included; nothing
    # logged after the second one did.
    assert steps == list(range(1, 61))


@pytest.mark.parametrize("failing", ["lora-step00000024", "step-000024"], ids=["lora-file", "training-state"])
def test_disk_full_while_saving_keeps_what_was_saved(tiny_model: Path, tmp_path: Path, failing: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up while the step-24 snapshot (or state) is written: one paragraph naming the file,
    exit 2, the step-12 LoRA and state intact and loadable, no partial or temporary file anywhere, the run
    FAILED; `lorasweep resume` then finishes it from the step-12 state."""
    args = ["train", *QUIET, "training.max_steps=36", "output.save_every_n_steps=12", "output.save_state=true",
            "tracking.enabled=false"]
    monkeypatch.setenv("LORASWEEP_FAULT", f"enospc:file={failing}")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as stopped:
        main_in(tmp_path, args)
    line = user_error_line(int(str(stopped.value.code)), stderr.getvalue(), "No space left on device", failing,
                           "lorasweep resume")
    assert "intact" in line
    monkeypatch.delenv("LORASWEEP_FAULT")
    run = _only_run(tmp_path)
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "FAILED" and "No space left on device" in record["error"]
    snapshots = sorted(p.name for p in (run / "lora").iterdir())
    expected = ["lora-step00000012.safetensors"] + (["lora-step00000024.safetensors"] if failing.startswith("step-")
                                                    else [])
    assert snapshots == expected
    for name in snapshots:
        assert load_file(run / "lora" / name)  # complete files
    assert sorted(p.name for p in (run / "state").iterdir()) == ["step-000012"]
    state = run / "state" / "step-000012"
    assert json.loads((state / "state.json").read_text())["step"] == 12
    torch.load(state / "training.pt", weights_only=True)
    if failing.startswith("step-"):
        return  # the resume below is the same for both
    assert main_in(tmp_path, ["resume", str(run)]) == 0
    resumed = next(p for p in (tmp_path / "outputs" / "runs").iterdir() if p.name.endswith("-resume"))
    assert json.loads((resumed / "run.json").read_text())["steps"] == 36
    assert json.loads((run / "run.json").read_text())["status"] == "FAILED"  # a final status stays as it was
