"""Scale-out launchers end to end on this machine: lorasweep_process (worker processes, one fake GPU each),
joblib (local processes), submitit_local (the SLURM code path run locally) and lorasweep_ray (a local Ray
instance) run the same small sweep with async slots and pruning."""

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
    # lorasweep_process also pins one (fake) GPU per worker, and trial 3's worker is killed mid-training.
    "lorasweep_process": ["hydra.launcher.devices=[3,5]"],
    "joblib": ["hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra.launcher.timeout_min=30", "hydra.launcher.cpus_per_task=1"],
    "lorasweep_ray": ["++hydra.launcher.init_args.num_cpus=2", "++hydra.launcher.init_args.include_dashboard=false"],
}
KILL_TRIAL_3 = {"LORASWEEP_FAULT": "kill:step=10:trial=3"}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launcher_runs_async_slots_and_pruning(tiny_model: Path, tmp_path: Path, launcher: str) -> None:
    """3 trials in 2 slots: trial 1 is long, so trial 2 starts in the other slot while it runs (async slots);
    trial 2's far too large learning rate is pruned against trial 0 (pruning across processes); every trial
    has its run folder and MLflow child run under the sweep's parent run. With lorasweep_process (4 trials):
    each worker sees one of the two GPU ids and overlapping trials never share one; trial 3's worker gets
    SIGKILL, so trial 3 fails alone (its run closed as KILLED) and trial 4 runs in a fresh worker."""
    process = launcher == "lorasweep_process"
    args = sweep_args(tmp_path, launcher, f"hydra.sweeper.n_trials={4 if process else 3}",
                      "hydra.sweeper.max_parallel=2",
                      "hydra.sweeper.pruner=median", "++hydra.sweeper.pruner_args={n_startup_trials:1}",
                      f"hydra.sweeper.custom_search_space={HOOKS}.launcher_check", "network.dim=choice(4)",
                      "trial.num_threads=1", *LAUNCHERS[launcher], launcher=launcher)
    proc = run_cli(args, cwd=tmp_path, env={**ENV, **(KILL_TRIAL_3 if process else {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = sorted(load(tmp_path, launcher).trials, key=lambda t: t.number)
    expected = [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    if process:
        expected += [TrialState.FAIL, TrialState.COMPLETE]
    assert [t.state for t in trials] == expected
    long = trials[1]
    assert long.datetime_start < trials[2].datetime_start < long.datetime_complete  # the freed slot went on
    assert max(trials[2].intermediate_values) < 20  # pruned before its end

    sweep_dir = tmp_path / "sweeps" / launcher
    record = SweepRecord.read(sweep_dir)
    client = MlflowClient(tracking_uri=record.mlflow["tracking_uri"])
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in children(client, record.mlflow["parent_run_id"])}
    assert sorted(runs) == [t.number for t in trials]
    records = {n: json.loads((sweep_dir / str(n) / "run.json").read_text()) for n in runs}
    statuses = {n: r["status"] for n, r in records.items()}
    assert statuses == {0: "FINISHED", 1: "FINISHED", 2: "PRUNED", **({3: "KILLED", 4: "FINISHED"} if process else {})}
    assert runs[2].info.status == "KILLED" and runs[1].info.status == "FINISHED"
    if not process:
        return
    assert "killed by signal 9" in trials[3].user_attrs["error"] and "killed by signal 9" in records[3]["error"]
    assert runs[3].info.status == "KILLED" and runs[3].data.tags["optuna.state"] == "FAIL"
    assert records[4]["pid"] != records[3]["pid"]  # a fresh worker after the dead one
    seen = {n: r["cuda_visible_devices"] for n, r in records.items()}
    assert set(seen.values()) == {"3", "5"}
    overlapping = [(a, b) for a in trials for b in trials if a.number < b.number
                   and a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete]
    assert overlapping
    for a, b in overlapping:
        assert seen[a.number] != seen[b.number], (a.number, b.number, seen)


def test_bad_device_list_is_refused(tmp_path: Path) -> None:
    proc = run_cli(sweep_args(tmp_path, "bad", "hydra.sweeper.n_trials=1", "network.dim=choice(2,4)",
                              "hydra.launcher.devices=[1,1]"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hydra.launcher.devices" in proc.stderr and "distinct" in proc.stderr and "Traceback" not in proc.stderr
