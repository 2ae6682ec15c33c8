"""Scale-out launchers end to end on this machine: joblib (local processes), submitit_local (the SLURM code
path run locally) and lorasweep_ray (a local Ray instance) run the same small sweep with async slots and
pruning; the lorasweep_process launcher pins one GPU per trial process (a fake device list on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from lorasweep.sweeping.storage import SweepRecord
from tests.conftest import run_cli
from tests.e2e.test_sweep_run import ENV, HOOKS, children, load, sweep_args

LAUNCHERS = {
    "joblib": ["hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra.launcher.timeout_min=30", "hydra.launcher.cpus_per_task=1"],
    "lorasweep_ray": ["++hydra.launcher.init_args.num_cpus=2"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launcher_runs_async_slots_and_pruning(tiny_model: Path, tmp_path: Path, launcher: str) -> None:
    """4 trials in 2 slots: trial 1 is long, so trials 2 and 3 start and end in the other slot while it runs
    (async slots); trial 2's far too large learning rate is pruned against trial 0 (pruning across processes);
    every trial has its run folder and MLflow child run under the sweep's parent run."""
    args = sweep_args(tmp_path, launcher, "hydra.sweeper.n_trials=4", "hydra.sweeper.max_parallel=2",
                      "hydra.sweeper.pruner=median", "++hydra.sweeper.pruner_args={n_startup_trials:1}",
                      f"hydra.sweeper.custom_search_space={HOOKS}.launcher_check", "network.dim=choice(4)",
                      "trial.num_threads=1", *LAUNCHERS[launcher], launcher=launcher)
    proc = run_cli(args, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = sorted(load(tmp_path, launcher).trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED,
                                         TrialState.COMPLETE]
    long = trials[1]
    assert long.datetime_start < trials[2].datetime_start < long.datetime_complete  # the freed slot went on
    assert max(trials[2].intermediate_values) < 20  # pruned before its end

    sweep_dir = tmp_path / "sweeps" / launcher
    record = SweepRecord.read(sweep_dir)
    client = MlflowClient(tracking_uri=record.mlflow["tracking_uri"])
    runs = {r.data.tags["optuna.trial_number"]: r for r in children(client, record.mlflow["parent_run_id"])}
    assert sorted(runs) == ["0", "1", "2", "3"]
    statuses = {n: json.loads((sweep_dir / n / "run.json").read_text())["status"] for n in runs}
    assert statuses == {"0": "FINISHED", "1": "FINISHED", "2": "PRUNED", "3": "FINISHED"}
    assert runs["2"].info.status == "KILLED" and runs["1"].info.status == "FINISHED"


def test_one_trial_per_gpu(tiny_model: Path, tmp_path: Path) -> None:
    """hydra.launcher.devices=[3,5] with 2 slots: every trial process sees exactly one of the two GPU ids
    (CUDA_VISIBLE_DEVICES), and trials that overlap in time never share one."""
    args = sweep_args(tmp_path, "gpus", "hydra.sweeper.n_trials=4", "hydra.sweeper.max_parallel=2",
                      f"hydra.sweeper.custom_search_space={HOOKS}.long_first", "network.dim=choice(2,4,8)",
                      "hydra.launcher.devices=[3,5]", "trial.num_threads=1")
    proc = run_cli(args, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = load(tmp_path, "gpus").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    seen = {t.number: json.loads((tmp_path / "sweeps" / "gpus" / str(t.number) / "run.json").read_text())[
        "cuda_visible_devices"] for t in trials}
    assert set(seen.values()) == {"3", "5"}
    overlapping = [(a, b) for a in trials for b in trials if a.number < b.number
                   and a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete]
    assert overlapping  # the long trial 0 overlaps the others
    for a, b in overlapping:
        assert seen[a.number] != seen[b.number], (a.number, b.number, seen)


def test_bad_device_list_is_refused(tmp_path: Path) -> None:
    proc = run_cli(sweep_args(tmp_path, "bad", "hydra.sweeper.n_trials=1", "network.dim=choice(2,4)",
                              "hydra.launcher.devices=[1,1]"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hydra.launcher.devices" in proc.stderr and "distinct" in proc.stderr and "Traceback" not in proc.stderr
