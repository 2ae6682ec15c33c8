"""Faults while a run trains: the MLflow server going away (and coming back, or not), the disk filling up
while a LoRA or a training state is written. Nothing is lost or overwritten, every run ends with the right
status. (Exceptions, non-finite losses, out-of-memory and killed controllers in sweeps: test_sweep_run.py;
SIGKILL mid-epoch and an exact resume: test_train_options.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.conftest import LORASWEEP, MlflowServer, run_cli

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


@pytest.mark.parametrize("comes_back", [True, False], ids=["server-returns", "server-gone"])
def test_mlflow_server_going_away_mid_run(tiny_model: Path, tmp_path: Path, comes_back: bool) -> None:
    """The server stops at step 30 (and, in one case, is back by step 90). The run trains on and completes
    its folder; with the server back every queued metric arrives and the MLflow run ends FINISHED; with the
    server gone the run still ends FINISHED in its folder, and run.json and a warning name the gap."""
    server = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    url = server.start()
    work = tmp_path / "work"
    work.mkdir()
    fault = f"barrier:step=30:dir={barriers}" + (f";barrier:step=90:dir={barriers}" if comes_back else "")
    proc = subprocess.Popen([*LORASWEEP, "train", *QUIET, "training.max_steps=120", f"tracking.uri={url}"],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LORASWEEP_FAULT": fault})
    try:
        _wait_for(barriers / "reached-30", proc)
        server.stop()
        (barriers / "go-30").touch()
        if comes_back:
            _wait_for(barriers / "reached-90", proc)
            server.start()
            (barriers / "go-90").touch()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "Traceback" not in err
    run = _only_run(work)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "FINISHED" and record["steps"] == 120
    assert _logged_steps(run, "loss") == list(range(1, 121))  # the folder has every step
    assert (run / "lora" / "lora.safetensors").is_file()
    tracking = record["tracking"]
    assert tracking["outages"] == 1
    if not comes_back:
        assert tracking["complete"] is False and tracking["status_set"] is False
        assert tracking["unsent"]["metrics"] > 0 and tracking["last_error"]
        warning = " ".join(err.split())  # the console wraps long lines
        assert "did not get everything of this run" in warning and "'tracking' lists the gap" in warning
        assert f"The run folder {run} is complete" in (run / "train.log").read_text()
        return
    server.start()
    try:
        client = MlflowClient(tracking_uri=url)
        mlflow_run = client.get_run(record["mlflow"]["run_id"])
        assert mlflow_run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss")) == list(
            range(1, 121))  # no gap: what was queued during the outage arrived
        assert tracking["complete"] is True and tracking["unsent"] == {"metrics": 0, "images": 0, "artifacts": 0,
                                                                      "tags": 0}
        assert [a.path for a in client.list_artifacts(mlflow_run.info.run_id, "lora")] == ["lora/lora.safetensors"]
    finally:
        server.stop()


@pytest.mark.parametrize("failing", ["lora-step00000024", "step-000024"], ids=["lora-file", "training-state"])
def test_disk_full_while_saving_keeps_what_was_saved(tiny_model: Path, tmp_path: Path, failing: str) -> None:
    """The disk fills up while the step-24 snapshot (or state) is written: one paragraph naming the file,
    exit 2, the step-12 LoRA and state intact and loadable, no partial or temporary file anywhere, the run
    FAILED; `lorasweep resume` then finishes it from the step-12 state."""
    args = ["train", *QUIET, "training.max_steps=36", "output.save_every_n_steps=12", "output.save_state=true",
            "tracking.enabled=false"]
    proc = run_cli(args, cwd=tmp_path, env={"LORASWEEP_FAULT": f"enospc:file={failing}"})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "No space left on device" in proc.stderr and failing in proc.stderr
    assert "lorasweep resume" in proc.stderr
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

    proc = run_cli(["resume", str(run)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    resumed = next(p for p in (tmp_path / "outputs" / "runs").iterdir() if p.name.endswith("-resume"))
    assert json.loads((resumed / "run.json").read_text())["steps"] == 36
    assert json.loads((run / "run.json").read_text())["status"] == "FAILED"  # a final status stays as it was
