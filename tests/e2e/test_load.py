"""Consistency under load: a sweep of many short trials in 2 async slots against a real `mlflow server`.
Every Optuna trial has exactly one run folder and one MLflow child run, all three agree on the trial and all
end in a final state. The 50-trial run is `slow` (`pytest -m slow`); in CI the slots sweep of test_sweep_run.py
(4 trials, 2 slots, the session's mlflow server) checks the same agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from lorasweep.sweeping.storage import SweepRecord
from tests.conftest import run_cli
from tests.e2e.test_sweep_run import ENV, children, load, sweep_args

FINAL_TRIALS = {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
FINAL_RUNS = {"FINISHED", "KILLED", "FAILED", "PRUNED"}


@pytest.mark.slow
@pytest.mark.parametrize("n_trials", [50])
def test_trials_runs_and_folders_agree(mlflow_server: str, tiny_model: Path, tmp_path: Path, n_trials: int) -> None:
    name = f"load{n_trials}"
    args = sweep_args(tmp_path, name, f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.max_parallel=2",
                      "hydra.sweeper.pruner=median", "training.max_steps=6", "validation.every_n_steps=3",
                      "optimizer.lr=tag(log,interval(1e-4,3e-1))", "network.dim=choice(2,4,8)",
                      "trial.num_threads=1", f"tracking.uri={mlflow_server}", f"tracking.experiment={name}")
    proc = run_cli(args, cwd=tmp_path, env=ENV, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    trials = load(tmp_path, name).trials
    assert all(t.state in FINAL_TRIALS for t in trials), [t.state for t in trials]
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == n_trials
    numbers = {t.number for t in trials}
    assert numbers == set(range(len(trials)))

    sweep_dir = tmp_path / "sweeps" / name
    folders = {int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit()}
    assert folders == numbers
    records = {n: json.loads((sweep_dir / str(n) / "run.json").read_text()) for n in folders}
    assert all(r["status"] in FINAL_RUNS for r in records.values()), {n: r["status"] for n, r in records.items()}

    parent = SweepRecord.read(sweep_dir).mlflow["parent_run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = children(client, parent)
    by_trial = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    assert len(runs) == len(by_trial) == len(trials)  # one child run per trial, no duplicates
    assert set(by_trial) == numbers
    for number, run in by_trial.items():
        assert run.info.status in ("FINISHED", "KILLED", "FAILED"), (number, run.info.status)
        assert records[number]["mlflow"]["run_id"] == run.info.run_id
        assert records[number]["trial"]["number"] == number
    assert client.get_run(parent).info.status == "FINISHED"
