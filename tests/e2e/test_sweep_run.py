"""Sweeps end to end: the lorasweep Optuna sweeper (async slots, pruning across processes, failures and the
failure budget, resume after kill -9, several controllers, launchers) and grid multiruns, checked in the
Optuna storage, the run folders and MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState
from safetensors.torch import load_file

from lorasweep.sweeping.storage import SweepRecord, open_storage
from tests.conftest import LORASWEEP, REPO, cli_in, run_cli

HOOKS = "tests.e2e.sweep_hooks"
ENV = {"PYTHONPATH": str(REPO)}  # the controller imports the custom_search_space hooks from tests/


def sweep_args(root: Path, name: str, *extra: str, launcher: str = "lorasweep_process") -> list[str]:
    return ["train", "-m", "hydra/sweeper=lorasweep_optuna", f"hydra/launcher={launcher}",
            f"hydra.sweep.dir={root / 'sweeps' / name}", f"hydra.sweeper.study_name={name}",
            f"output.root={root}", "sampling.enabled=false", "training.max_steps=20",
            "validation.every_n_steps=10", "validation.repeats=1", *extra]


def load(root: Path, name: str) -> optuna.Study:
    record = SweepRecord.read(root / "sweeps" / name)
    return optuna.load_study(study_name=record.study_name, storage=open_storage(record.storage))


def children(client: MlflowClient, parent_id: str) -> list[Any]:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.fixture(scope="module")
def slots_sweep(tiny_model: Path, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 trials in 2 process slots against a real `mlflow server`; trial 0 is long, the others short. (Also the
    CI variant of test_load.py: every trial has exactly one folder and one MLflow child run, all agreeing.)"""
    root = tmp_path_factory.mktemp("slots")
    proc = run_cli(sweep_args(root, "slots", "hydra.sweeper.n_trials=4", "hydra.sweeper.max_parallel=2",
                              f"tracking.uri={mlflow_server}", "tracking.experiment=slots",
                              "hydra.sweeper.seed=0", f"hydra.sweeper.custom_search_space={HOOKS}.long_first",
                              "optimizer.lr=tag(log,interval(1e-4,1e-2))", "network.dim=choice(2,4,8)"),
                   cwd=root, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "proc": proc, "study": load(root, "slots"), "sweep_dir": root / "sweeps" / "slots"}


def test_async_slots_start_the_next_trial_when_one_ends(slots_sweep: dict[str, Any]) -> None:
    trials = sorted(slots_sweep["study"].trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    long = trials[0]
    assert long.params and trials[1].user_attrs["controller"] == long.user_attrs["controller"]
    for later in trials[2:]:
        # It starts right after some trial ended (its slot freed), while the long trial is still running.
        gaps = [(later.datetime_start - t.datetime_complete).total_seconds() for t in trials
                if t.datetime_complete <= later.datetime_start]
        assert gaps and min(gaps) < 5.0, gaps
        assert long.datetime_start < later.datetime_start < long.datetime_complete
    assert trials[3].datetime_start >= trials[2].datetime_complete  # short trials queue in the free slot


def test_trial_folders_mlflow_and_optuna_are_cross_linked(slots_sweep: dict[str, Any]) -> None:
    sweep_dir, study = slots_sweep["sweep_dir"], slots_sweep["study"]
    record = SweepRecord.read(sweep_dir)
    client = MlflowClient(tracking_uri=record.mlflow["tracking_uri"])
    parent = client.get_run(record.mlflow["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study"] == "slots"
    assert parent.data.tags["optuna.best_trial"] == str(study.best_trial.number)
    assert parent.data.params["space.optimizer.lr"] == "tag(log,interval(1e-4,1e-2))"
    assert abs(parent.data.metrics["best_val_loss"] - study.best_value) < 1e-9
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/leaderboard.csv", "report/optimization_results.yaml", "report/plots.html"} <= artifacts
    listed = children(client, parent.info.run_id)
    runs = {r.data.tags["optuna.trial_number"]: r for r in listed}
    assert sorted(runs) == ["0", "1", "2", "3"] and len(listed) == 4  # one child run per trial, no duplicate
    assert record.mlflow["tracking_uri"].startswith("http://127.0.0.1:")  # the session's real server
    for trial in study.trials:
        run = runs[str(trial.number)]
        run_dir = sweep_dir / str(trial.number)
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "FINISHED" and info["trial"]["number"] == trial.number
        assert info["mlflow"]["run_id"] == run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert trial.user_attrs["run_dir"] == str(run_dir.resolve())
        assert run.info.status == "FINISHED"
        assert run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.tags["optuna.study"] == "slots"
        assert run.data.tags["hydra.job.num"] == str(trial.number)
        assert run.data.tags["lorasweep.run_dir"] == str(run_dir.resolve())
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
        assert run.data.params["trial.num_threads"] == "1"  # 2 cores shared by 2 slots
        assert abs(run.data.metrics["val_loss"] - trial.value) < 1e-9


def test_report_files_and_rebuild(slots_sweep: dict[str, Any]) -> None:
    sweep_dir, study = slots_sweep["sweep_dir"], slots_sweep["study"]
    stdout = slots_sweep["proc"].stdout
    assert "optimizer.lr" in stdout and "COMPLETE" in stdout  # the leaderboard table
    log = slots_sweep["proc"].stderr + stdout  # the progress lines: done/running/pruned/failed, best so far
    assert "sweep: 1/4 done, 1 running, 0 pruned, 0 failed, best " in log
    assert "sweep: 4/4 done, 0 running, 0 pruned, 0 failed, best " in log
    results = (sweep_dir / "optimization_results.yaml").read_text()
    assert f"trial: {study.best_trial.number}" in results
    for name in ("leaderboard.csv", "plots.html", "optimization_history.png", "parallel_coordinate.png"):
        assert (sweep_dir / "report" / name).stat().st_size > 500, name
    assert (sweep_dir / "multirun.yaml").is_file()
    before = (sweep_dir / "report" / "leaderboard.csv").read_text()
    (sweep_dir / "report" / "leaderboard.csv").unlink()
    proc = run_cli(["report", str(sweep_dir)], cwd=slots_sweep["root"])
    assert proc.returncode == 0, proc.stderr
    assert (sweep_dir / "report" / "leaderboard.csv").read_text() == before


def test_pruning_failures_and_the_failure_budget(tiny_model: Path, tmp_path: Path) -> None:
    """In-process (basic launcher): a pruned trial stops early, a non-finite loss and a bad config fail
    their trial but not the sweep; a resumed sweep stops once failures over the whole study pass the budget.
    The objective is one validation timestep's loss, which trials report, and the pruner judges, as they run."""
    args = sweep_args(tmp_path, "faults", "hydra.sweeper.n_trials=3", "hydra.sweeper.max_failures=2",
                      "hydra.sweeper.objective=val_loss/t800",
                      "hydra.sweeper.pruner=median", "++hydra.sweeper.pruner_args={n_startup_trials:1}",
                      "training.max_steps=40", f"hydra.sweeper.custom_search_space={HOOKS}.outcomes",
                      "network.dim=choice(4)", launcher="basic")
    proc = cli_in(tmp_path, args, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load(tmp_path, "faults")
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.PRUNED, 2: TrialState.FAIL, 3: TrialState.FAIL,
                      4: TrialState.COMPLETE}
    pruned = study.trials[1]
    assert max(pruned.intermediate_values) < 40  # it stopped before the end
    assert pruned.intermediate_values[10] > study.trials[0].intermediate_values[10]
    first = json.loads((tmp_path / "sweeps" / "faults" / "0" / "run.json").read_text())
    assert study.trials[0].value == first["objectives"]["val_loss/t800"] != first["val_loss"]
    rows = map(json.loads, (tmp_path / "sweeps" / "faults" / "0" / "metrics.jsonl").read_text().splitlines())
    reported = {row["step"]: row["val_loss/t800"] for row in rows if "val_loss/t800" in row}
    assert study.trials[0].intermediate_values == {s: v for s, v in reported.items() if s > 0}
    assert "became nan" in study.trials[2].user_attrs["error"] or "became inf" in study.trials[2].user_attrs["error"]
    assert "network.dim" in study.trials[3].user_attrs["error"]

    sweep_dir = tmp_path / "sweeps" / "faults"
    record = SweepRecord.read(sweep_dir)
    client = MlflowClient(tracking_uri=record.mlflow["tracking_uri"])
    runs = {r.data.tags["optuna.trial_number"]: r for r in children(client, record.mlflow["parent_run_id"])}
    assert (runs["1"].info.status, runs["1"].data.tags["optuna.state"]) == ("KILLED", "PRUNED")
    assert (runs["2"].info.status, runs["2"].data.tags["optuna.state"]) == ("FAILED", "FAIL")
    assert "NonFiniteLossError" in runs["2"].data.tags["lorasweep.error"]
    pruned_record = json.loads((sweep_dir / "1" / "run.json").read_text())
    assert pruned_record["status"] == "PRUNED" and "pruned at step" in pruned_record["pruned"]
    assert not list((sweep_dir / "1").rglob("*.safetensors"))  # a pruned run saves no LoRA

    # Resume with a larger study: trial 5 explodes too, and 3 failures > max_failures=2 stops the sweep.
    proc = cli_in(tmp_path, [*args, "hydra.sweeper.n_trials=5"], env=ENV)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the sweep stopped early: 3 trials failed, more than hydra.sweeper.max_failures=2" in proc.stderr
    assert "Traceback" not in proc.stderr
    study = load(tmp_path, "faults")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4, 5]
    assert study.trials[5].state == TrialState.FAIL
    assert client.get_run(record.mlflow["parent_run_id"]).info.status == "FAILED"


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_resume_after_the_controller_is_killed(tiny_model: Path, tmp_path: Path) -> None:
    args = sweep_args(tmp_path, "resume", "hydra.sweeper.n_trials=3", "hydra.sweeper.max_parallel=1",
                      "hydra.sweeper.sampler=random", "hydra.sweeper.seed=0", "hydra.sweeper.retry_interrupted=true",
                      "training.max_steps=60", "validation.every_n_steps=20",
                      "optimizer.lr=tag(log,interval(1e-4,1e-2))")
    controller = subprocess.Popen([*LORASWEEP, *args], cwd=tmp_path, env={**os.environ, **ENV},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "sweeps" / "resume" / "optuna.journal"

    def run_status(number: int) -> str | None:
        path = tmp_path / "sweeps" / "resume" / str(number) / "run.json"
        return json.loads(path.read_text())["status"] if path.exists() else None

    def one_done_one_training() -> bool:
        if not (tmp_path / "sweeps" / "resume" / "sweep.json").exists() or not journal.exists():
            return False
        trials = load(tmp_path, "resume").trials
        return any(t.state == TrialState.COMPLETE for t in trials) and any(
            t.state == TrialState.RUNNING and run_status(t.number) == "RUNNING" for t in trials)

    try:
        _wait_for(one_done_one_training, 240, "a finished and a training trial")
    finally:
        controller.send_signal(signal.SIGKILL)
        controller.wait()
    interrupted = [t for t in load(tmp_path, "resume").trials if t.state == TrialState.RUNNING]
    assert interrupted
    training = [t.number for t in interrupted if run_status(t.number) == "RUNNING"]
    assert training
    pids = [json.loads((tmp_path / "sweeps" / "resume" / str(t.number) / "run.json").read_text())["pid"]
            for t in interrupted if (tmp_path / "sweeps" / "resume" / str(t.number) / "run.json").exists()]

    def trial_processes_gone() -> bool:
        return not [pid for pid in pids if Path(f"/proc/{pid}").exists()
                    and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]

    _wait_for(trial_processes_gone, 20, "the trial processes to die with their controller")
    first_numbers = {t.number for t in load(tmp_path, "resume").trials}

    proc = run_cli(args, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load(tmp_path, "resume")
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 3
    for old in interrupted:
        trial = study.trials[old.number]
        assert trial.state == TrialState.FAIL and "interrupted" in trial.user_attrs["error"]
        retry = [t for t in study.trials if t.user_attrs.get("retry_of") == old.number]
        assert len(retry) == 1 and retry[0].params == old.params and retry[0].number not in first_numbers
    for number in training:  # the job died with its controller; the resumed sweep closed its run folder
        assert run_status(number) == "KILLED"
    proposed = [t.params["optimizer.lr"] for t in study.trials if "retry_of" not in t.user_attrs]
    assert len(set(proposed)) == len(proposed), proposed  # the resumed sampler did not replay the first run
    # One folder per trial that got as far as starting its job (a trial killed while its process was still
    # starting has none), each holding that trial's own run: no folder was reused.
    folders = sorted(int(p.name) for p in (tmp_path / "sweeps" / "resume").iterdir() if p.name.isdigit())
    assert set(folders) <= set(numbers)
    finished = [t.number for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert set(finished) <= set(folders)
    for number in folders:
        path = tmp_path / "sweeps" / "resume" / str(number) / "run.json"
        if path.exists():
            assert json.loads(path.read_text())["trial"]["number"] == number
        else:  # killed between Hydra creating the job folder and the run writing run.json
            assert number in {t.number for t in interrupted}


def test_two_controllers_share_one_study(tiny_model: Path, tmp_path: Path) -> None:
    args = sweep_args(tmp_path, "shared", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler=random",
                      "optimizer.lr=tag(log,interval(1e-4,1e-2))", "trial.num_threads=1",  # 2 controllers, 2 cores
                      launcher="basic")  # trials in the controllers
    procs = [subprocess.Popen([*LORASWEEP, *args], cwd=tmp_path, env={**os.environ, **ENV},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = load(tmp_path, "shared")
    assert sorted(t.number for t in study.trials) == [0, 1, 2]  # exactly n_trials, numbers unique
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["controller"] for t in study.trials}) == 2  # both did work
    record = SweepRecord.read(tmp_path / "sweeps" / "shared")
    client = MlflowClient(tracking_uri=record.mlflow["tracking_uri"])
    parents = client.search_runs([client.get_experiment_by_name("lorasweep").experiment_id],
                                 filter_string="tags.`optuna.study` = 'shared' and tags.`lorasweep.sweeper` = "
                                               "'lorasweep_optuna'")
    assert len(parents) == 1  # one parent run for the shared sweep folder
    runs = children(client, parents[0].info.run_id)
    assert len(runs) == 3 and {r.data.params["trial.num_threads"] for r in runs} == {"1"}  # the user's, kept


def test_grid_multirun_reuses_one_worker_and_has_a_parent_run_and_a_report(tiny_model: Path,
                                                                           tmp_path: Path) -> None:
    """A grid (Hydra's sweeper) on the lorasweep_process launcher: one worker runs every job with the base model
    loaded once, and a reused worker trains bit for bit what a fresh process trains — although the jobs before
    left every trace a run can leave on a cached model (bf16 autocast patches forward, gradient checkpointing,
    LoRA on UNet and text encoder in train mode). One MLflow parent run, a report."""
    common = ["sampling.enabled=false", "training.max_steps=10", "validation.every_n_steps=5", "validation.repeats=1",
              "training.gradient_checkpointing=true", "trial.num_threads=1"]
    proc = run_cli(["train", "-m", "hydra/launcher=lorasweep_process", "precision=bf16,fp32",
                    "optimizer.lr=1e-2", f"output.root={tmp_path}", *common], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fresh = run_cli(["train", "precision=fp32", "optimizer.lr=1e-2", "tracking=off",
                     f"output.root={tmp_path / 'fresh'}", *common], cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    (sweep_dir,) = (tmp_path / "sweeps").iterdir()
    records = [json.loads((sweep_dir / str(j) / "run.json").read_text()) for j in range(2)]
    assert len({r["model_load"]["pid"] for r in records}) == 1
    assert [r["model_load"]["cached"] for r in records] == [False, True]
    assert all(r["feature_cache"]["latents"]["built"] == 0 for r in records[1:])  # encoded by job 0 at most
    # bf16 jobs keep PyTorch's kernels, fp32 ones pick them by size; job 1 still equals a fresh run
    assert [r["conv_kernels"]["mode"] for r in records] == ["default", "size"]
    (fresh_run,) = (tmp_path / "fresh" / "runs").iterdir()
    reference = load_file(fresh_run / "lora" / "lora.safetensors")
    reused = load_file(sweep_dir / "1" / "lora" / "lora.safetensors")  # fp32, lr 1e-2: the fresh run's config
    assert reused.keys() == reference.keys() and any(k.startswith("lora_te_") for k in reused)
    assert all(torch.equal(reused[k], reference[k]) for k in reference)
    assert records[1]["val_loss"] == json.loads((fresh_run / "run.json").read_text())["val_loss"]
    assert 0 < records[1]["time_to_first_step_s"] < records[1]["duration_s"]
    assert records[1]["peak_rss_mib"] >= records[0]["peak_rss_mib"] > 100  # one process: its peak so far
    shares = [json.loads(line).get("throughput/data_wait_share")
              for line in (sweep_dir / "1" / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in shares if x is not None] and all(0 <= x <= 1 for x in shares if x is not None)

    record = SweepRecord.read(sweep_dir)
    assert record.params == ["precision"] and record.storage == ""
    client = MlflowClient(tracking_uri=record.mlflow["tracking_uri"])
    parent = client.get_run(record.mlflow["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["lorasweep.sweeper"] == "grid"
    runs = children(client, parent.info.run_id)
    assert sorted(r.data.tags["hydra.job.num"] for r in runs) == ["0", "1"]
    best = min(runs, key=lambda r: r.data.metrics["val_loss"])
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.data.metrics["val_loss"])
    assert parent.data.tags["best.precision"] == ["bf16", "fp32"][int(best.data.tags["hydra.job.num"])]
    assert (sweep_dir / "optimization_results.yaml").is_file()
    assert (sweep_dir / "report" / "leaderboard.csv").read_text().count("\n") == 3  # header + 2 jobs


def test_multi_objective_study_in_an_rdb_storage(tiny_model: Path, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = sweep_args(tmp_path, "pareto", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
                      "hydra.sweeper.objective=[val_loss,steps_per_s]", "hydra.sweeper.direction=[minimize,maximize]",
                      "network.dim=choice(2,8)", "hydra.sweeper.sampler=grid", "training.max_steps=10",
                      launcher="basic")
    proc = cli_in(tmp_path, args, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "sweeps" / "pareto" / "optuna.journal").exists()
    study = optuna.load_study(study_name="pareto", storage=storage)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    for trial in study.trials:
        info = json.loads((tmp_path / "sweeps" / "pareto" / str(trial.number) / "run.json").read_text())
        assert trial.values[0] == pytest.approx(info["val_loss"])
        assert 0 < trial.values[1] == pytest.approx(info["steps"] / info["train_time_s"])
    results = (tmp_path / "sweeps" / "pareto" / "optimization_results.yaml").read_text()
    assert "best_trials:" in results


def test_timeout_stops_starting_trials(tiny_model: Path, tmp_path: Path) -> None:
    args = sweep_args(tmp_path, "timeout", "hydra.sweeper.n_trials=5", "hydra.sweeper.timeout=1",
                      "network.dim=choice(2,4,8)", launcher="basic")
    proc = cli_in(tmp_path, args, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(load(tmp_path, "timeout").trials) == 1  # the first trial outlasts the 1 s timeout
    assert "hydra.sweeper.timeout reached" in proc.stderr + proc.stdout


def test_out_of_memory_fails_the_trial_not_the_sweep(tiny_model: Path, tmp_path: Path) -> None:
    args = sweep_args(tmp_path, "oom", "hydra.sweeper.n_trials=1", "network.dim=choice(2,4)", launcher="basic")
    proc = cli_in(tmp_path, args, env={**ENV, "LORASWEEP_FAULT": "oom:step=10:trial=0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, second = load(tmp_path, "oom").trials
    assert first.state == TrialState.FAIL and "OutOfMemoryError" in first.user_attrs["error"]
    assert second.state == TrialState.COMPLETE
    info = json.loads((tmp_path / "sweeps" / "oom" / "0" / "run.json").read_text())
    assert info["status"] == "FAILED" and "out of memory" in info["error"]


def test_quickstart_preset_runs(tiny_model: Path, tmp_path: Path) -> None:
    """The README's main job, shortened: `lorasweep sweep quickstart` with two short trials."""
    proc = run_cli(["sweep", "quickstart", "hydra.sweeper.n_trials=2", "hydra.sweeper.max_parallel=1",
                    "training.max_steps=10",
                    "validation.every_n_steps=5", f"output.root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load(tmp_path, "quickstart")
    assert len(study.trials) == 2 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert set(study.trials[0].params) == {"optimizer.lr", "network.dim", "network.alpha_ratio", "scheduler"}
    record = SweepRecord.read(tmp_path / "sweeps" / "quickstart")
    parent = MlflowClient(tracking_uri=record.mlflow["tracking_uri"]).get_run(record.mlflow["parent_run_id"])
    assert parent.data.params["space.network.dim"] == "choice(2, 4, 8, 16)"
    assert "space.+sweeps" not in parent.data.params and "space.sweeps" not in parent.data.params
