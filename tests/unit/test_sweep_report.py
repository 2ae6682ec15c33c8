"""``lorasweep.sweeping.report``: leaderboard order, results files, plots and the MLflow parent run, on small
studies built directly with Optuna in a journal storage (no training)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from rich.console import Console

from lorasweep.errors import UserError
from lorasweep.sweeping import report
from lorasweep.sweeping.storage import SweepRecord, journal_url, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

PARAMS = ["optimizer.lr", "network.dim", "scheduler"]
DISTS = {"optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True), "network.dim": IntDistribution(4, 64),
         "scheduler": CategoricalDistribution(["constant", "cosine"])}
PNG = b"\x89PNG\r\n\x1a\n"


def new_study(sweep_dir: Path, directions: list[str] | None = None, name: str = "sweep") -> optuna.Study:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(journal_url(sweep_dir / "optuna.journal"))
    return optuna.create_study(study_name=name, storage=storage, directions=directions or ["minimize"],
                               sampler=optuna.samplers.RandomSampler(seed=0))


def add(study: optuna.Study, sweep_dir: Path, params: dict[str, Any], *, value: Any = None,
        reports: tuple[tuple[int, float], ...] = (), state: TrialState = TrialState.COMPLETE,
        error: str | None = None, dists: dict[str, Any] | None = None) -> int:
    """One trial as the sweeper makes it: fixed params, user attrs, intermediate values, then told."""
    study.enqueue_trial(params)
    trial = study.ask({k: v for k, v in (dists or DISTS).items() if k in params})
    run_dir = sweep_dir / "runs" / f"trial_{trial.number}"
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("mlflow_run_id", f"run{trial.number}")
    for step, loss in reports:
        trial.report(loss, step)
    if error is not None:
        trial.set_user_attr("error", error)
    if state == TrialState.RUNNING:
        return trial.number
    if state == TrialState.COMPLETE:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)
    return trial.number


def p(lr: float, dim: int, scheduler: str) -> dict[str, Any]:
    return {"optimizer.lr": lr, "network.dim": dim, "scheduler": scheduler}


def build_mixed(sweep_dir: Path, direction: str = "minimize") -> optuna.Study:
    """0 COMPLETE .30, 1 PRUNED (.6 @10), 2 COMPLETE .20, 3 FAIL, 4 PRUNED (.35 @20), 5 COMPLETE .25, 6 RUNNING."""
    study = new_study(sweep_dir, [direction])
    add(study, sweep_dir, p(1e-4, 8, "constant"), value=0.30, reports=((10, 0.5), (20, 0.3)))
    add(study, sweep_dir, p(1e-2, 4, "constant"), reports=((10, 0.6),), state=TrialState.PRUNED)
    add(study, sweep_dir, p(3e-4, 16, "cosine"), value=0.20, reports=((10, 0.4), (20, 0.2)))
    add(study, sweep_dir, p(5e-3, 32, "cosine"), state=TrialState.FAIL, error="CUDA out of memory")
    add(study, sweep_dir, p(2e-3, 8, "cosine"), reports=((10, 0.45), (20, 0.35)), state=TrialState.PRUNED)
    add(study, sweep_dir, p(2e-4, 64, "constant"), value=0.25, reports=((10, 0.42), (20, 0.25)))
    add(study, sweep_dir, p(1e-3, 16, "constant"), reports=((10, 0.5),), state=TrialState.RUNNING)
    return study


def write_record(sweep_dir: Path, study: optuna.Study, *, objectives: list[str] | None = None,
                 params: list[str] | None = None, mlflow: dict[str, str] | None = None) -> SweepRecord:
    record = SweepRecord(study_name=study.study_name, storage=journal_url(sweep_dir / "optuna.journal"),
                         objectives=objectives or ["val_loss"],
                         directions=[d.name.lower() for d in study.directions],
                         params=PARAMS if params is None else params, mlflow=mlflow or {})
    record.write(sweep_dir)
    return record


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, optuna.Study, SweepRecord]:
    sweep_dir = tmp_path / "sweep"
    study = build_mixed(sweep_dir)
    return sweep_dir, study, write_record(sweep_dir, study)


def test_leaderboard_minimize(mixed: tuple[Path, optuna.Study, SweepRecord]) -> None:
    sweep_dir, study, _ = mixed
    rows = report.leaderboard(study, PARAMS, objectives=["val_loss"])
    assert [r["trial"] for r in rows] == [2, 5, 0, 4, 1, 3, 6]
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3 + ["PRUNED"] * 2 + ["FAIL", "RUNNING"]
    assert list(rows[0]) == report.leaderboard_columns(["val_loss"], PARAMS)
    best = rows[0]
    assert best["val_loss"] == pytest.approx(0.20) and best["intermediate"] is False
    assert (best["optimizer.lr"], best["network.dim"], best["scheduler"]) == (3e-4, 16, "cosine")
    assert best["steps"] == 20 and best["run_dir"] == str(sweep_dir / "runs" / "trial_2")
    assert best["mlflow_run_id"] == "run2" and best["duration_s"] >= 0 and best["error"] is None
    pruned = rows[3]
    assert pruned["val_loss"] == pytest.approx(0.35) and pruned["intermediate"] is True and pruned["steps"] == 20
    assert rows[4]["val_loss"] == pytest.approx(0.6) and rows[4]["steps"] == 10
    failed = rows[5]
    assert failed["val_loss"] is None and failed["error"] == "CUDA out of memory"
    assert rows[6]["val_loss"] is None and rows[6]["duration_s"] is None  # RUNNING: no value yet
    # Without names: the study's own ("value").
    assert "value" in report.leaderboard(study, PARAMS)[0]


def test_leaderboard_maximize(tmp_path: Path) -> None:
    study = build_mixed(tmp_path / "sweep", "maximize")
    rows = report.leaderboard(study, PARAMS)
    assert [r["trial"] for r in rows] == [0, 5, 2, 1, 4, 3, 6]
    assert rows[0]["value"] == pytest.approx(0.30) and rows[3]["value"] == pytest.approx(0.6)


def build_multi(sweep_dir: Path) -> optuna.Study:
    """(val_loss min, clip max): front = 0 (.1,.5), 3 (.15,.6), 1 (.2,.9); dominated: 4 (.12,.3), 2 (.3,.4)."""
    study = new_study(sweep_dir, ["minimize", "maximize"], name="multi")
    for i, values in enumerate([(0.1, 0.5), (0.2, 0.9), (0.3, 0.4), (0.15, 0.6), (0.12, 0.3)]):
        add(study, sweep_dir, p(10 ** -(2 + i / 2), 4 * (i + 1), ["constant", "cosine"][i % 2]), value=values)
    add(study, sweep_dir, p(1e-3, 8, "cosine"), state=TrialState.FAIL, error="boom")
    return study


def test_leaderboard_multi_objective_pareto_first(tmp_path: Path) -> None:
    study = build_multi(tmp_path / "sweep")
    rows = report.leaderboard(study, PARAMS, objectives=["val_loss", "clip"])
    assert [r["trial"] for r in rows] == [0, 3, 1, 4, 2, 5]
    assert (rows[2]["val_loss"], rows[2]["clip"]) == (pytest.approx(0.2), pytest.approx(0.9))
    assert rows[-1]["state"] == "FAIL" and rows[-1]["val_loss"] is None and rows[-1]["clip"] is None


def test_print_leaderboard(mixed: tuple[Path, optuna.Study, SweepRecord]) -> None:
    sweep_dir, study, _ = mixed
    rows = report.leaderboard(study, PARAMS, objectives=["val_loss"])
    console = Console(record=True, width=200)
    report.print_leaderboard(rows, PARAMS, console=console, title="Sweep sweep")
    text = console.export_text()
    for name in ["trial", "state", "val_loss", *PARAMS, "run folder", "Sweep sweep"]:
        assert name in text
    for row in rows:
        assert str(sweep_dir / "runs" / f"trial_{row['trial']}") in text
    assert "0.35 (step 20)" in text and "PRUNED" in text and "FAIL" in text
    lines = [line for line in text.splitlines() if "trial_" in line]
    assert [int(line.split("trial_")[1].split()[0]) for line in lines] == [2, 5, 0, 4, 1, 3, 6]

    console = Console(record=True, width=200)
    report.print_leaderboard(rows, PARAMS, console=console, limit=2, base=sweep_dir)
    text = console.export_text()
    assert "runs/trial_5" in text and "trial_0" not in text and "5 more trials" in text
    console = Console(record=True, width=200)
    report.print_leaderboard([], PARAMS, console=console)
    assert "no trials yet" in console.export_text()


def test_write_results(mixed: tuple[Path, optuna.Study, SweepRecord]) -> None:
    sweep_dir, study, record = mixed
    path = report.write_results(study, record, sweep_dir)
    assert path == sweep_dir / "optimization_results.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["name"] == "sweep" and data["directions"] == ["minimize"] and data["objectives"] == ["val_loss"]
    assert data["best"]["trial"] == 2 and data["best"]["value"] == pytest.approx(0.2)
    assert data["best"]["values"] == {"val_loss": pytest.approx(0.2)}
    assert data["best"]["params"] == {"optimizer.lr": 3e-4, "network.dim": 16, "scheduler": "cosine"}
    assert data["best"]["run_dir"] == str(sweep_dir / "runs" / "trial_2")
    assert data["best_params"] == data["best"]["params"] and data["best_value"] == pytest.approx(0.2)
    assert data["counts"] == {"COMPLETE": 3, "PRUNED": 2, "FAIL": 1, "RUNNING": 1, "WAITING": 0}
    assert data["n_trials"] == 7

    with open(sweep_dir / "report" / "leaderboard.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == report.leaderboard_columns(["val_loss"], PARAMS)
        rows = list(reader)
    assert [r["trial"] for r in rows] == ["2", "5", "0", "4", "1", "3", "6"]
    assert float(rows[0]["val_loss"]) == pytest.approx(0.2) and rows[0]["scheduler"] == "cosine"
    assert rows[3]["state"] == "PRUNED" and rows[3]["intermediate"] == "True" and rows[3]["steps"] == "20"
    assert rows[5]["error"] == "CUDA out of memory" and rows[5]["val_loss"] == ""


def check_html(html: str, titles: list[str]) -> None:
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs()
    assert "plotly" in html
    assert html.count(bundle[:60]) == 1  # the plotly.js banner: inline, exactly once
    assert len(bundle) < len(html) < 2 * len(bundle)
    assert "<script src=" not in html and "<script type=\"text/javascript\" src=" not in html  # nothing fetched
    for title in titles:
        assert title in html


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000, path


def test_write_plots(mixed: tuple[Path, optuna.Study, SweepRecord]) -> None:
    sweep_dir, study, _ = mixed
    out = sweep_dir / "report"
    files = report.write_plots(study, out, params=PARAMS, objectives=["val_loss"])
    stems = ["optimization_history", "parallel_coordinate", "param_importances", "intermediate_values"]
    assert files == [out / "plots.html", *(out / f"{stem}.png" for stem in stems)]
    for png in files[1:]:
        check_png(png)
    html = files[0].read_text()
    check_html(html, ["Optimization History Plot", "Parallel Coordinate Plot", "Hyperparameter Importances",
                      "Intermediate Values Plot"])
    assert "Not drawn" not in html and "val_loss" in html
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files left


def test_multi_objective_results_and_plots(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    study = build_multi(sweep_dir)
    record = write_record(sweep_dir, study, objectives=["val_loss", "clip"])
    data = yaml.safe_load(report.write_results(study, record, sweep_dir).read_text())
    assert "best" not in data and data["directions"] == ["minimize", "maximize"]
    assert [t["trial"] for t in data["best_trials"]] == [0, 3, 1]
    assert data["best_trials"][2]["values"] == {"val_loss": pytest.approx(0.2), "clip": pytest.approx(0.9)}
    files = report.write_plots(study, sweep_dir / "report", params=PARAMS, objectives=["val_loss", "clip"])
    assert [f.name for f in files] == ["plots.html", "optimization_history.png", "parallel_coordinate.png",
                                       "param_importances.png"]
    html = files[0].read_text()
    check_html(html, ["Optimization History Plot", "Parallel Coordinate Plot", "Hyperparameter Importances"])
    assert "multi-objective studies have no intermediate values" in html


def test_report_without_complete_trials(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    study = new_study(sweep_dir)
    add(study, sweep_dir, p(1e-2, 4, "constant"), reports=((10, 0.6),), state=TrialState.PRUNED)
    add(study, sweep_dir, p(5e-3, 32, "cosine"), state=TrialState.FAIL, error="boom")
    write_record(sweep_dir, study)
    console = Console(record=True, width=200)
    out = report.build_report(sweep_dir, log_to_mlflow=False, console=console)
    assert out == sweep_dir / "report"
    data = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert data["best"] is None and data["counts"]["PRUNED"] == 1 and data["n_trials"] == 2
    html = (out / "plots.html").read_text()
    assert html.count("Not drawn: no trial has completed yet.") == 3 and "Intermediate Values Plot" in html
    assert sorted(f.name for f in out.iterdir()) == ["intermediate_values.png", "leaderboard.csv", "plots.html"]
    assert "trial_0" in console.export_text()


def test_report_with_one_param_and_one_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    study = new_study(sweep_dir)
    dists = {"optimizer.lr": DISTS["optimizer.lr"]}
    add(study, sweep_dir, {"optimizer.lr": 1e-4}, value=0.4, dists=dists)
    write_record(sweep_dir, study, params=["optimizer.lr"])
    out = report.build_report(sweep_dir, log_to_mlflow=False, console=Console(record=True))
    html = (out / "plots.html").read_text()
    assert "Not drawn: importances need at least 2 complete trials." in html
    assert "Not drawn: no trial has reported intermediate values." in html
    check_png(out / "optimization_history.png")
    check_png(out / "parallel_coordinate.png")
    assert not (out / "param_importances.png").exists()
    # A second trial with the same value of the only param: importances still cannot be computed.
    add(study, sweep_dir, {"optimizer.lr": 1e-4}, value=0.3, dists=dists)
    report.build_report(sweep_dir, log_to_mlflow=False, console=Console(record=True))
    assert "no swept parameter varies" in (out / "plots.html").read_text()
    data = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert data["best"]["trial"] == 1 and data["best"]["params"] == {"optimizer.lr": 1e-4}


def test_not_a_sweep_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a lorasweep sweep folder"):
        report.build_report(tmp_path, log_to_mlflow=False)
    study = new_study(tmp_path)
    record = write_record(tmp_path, study)
    record.study_name = "other"
    record.write(tmp_path)
    with pytest.raises(UserError, match="'other'"):
        report.build_report(tmp_path, log_to_mlflow=False)


def test_build_report_logs_to_mlflow_parent_run(mixed: tuple[Path, optuna.Study, SweepRecord],
                                                tmp_path: Path) -> None:
    from mlflow import MlflowClient

    sweep_dir, study, _ = mixed
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("sweeps", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    write_record(sweep_dir, study, mlflow={"tracking_uri": uri, "experiment_id": experiment_id,
                                           "parent_run_id": parent})

    report.build_report(sweep_dir, console=Console(record=True, width=200))
    run = client.get_run(parent)
    assert run.data.params == {"best.optimizer.lr": "0.0003", "best.network.dim": "16", "best.scheduler": "cosine"}
    assert run.data.metrics["best_val_loss"] == pytest.approx(0.2)
    assert run.data.tags["optuna.best_trial"] == "2" and run.data.tags["best.network.dim"] == "16"
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    assert artifacts == {f"report/{name}" for name in [
        "leaderboard.csv", "optimization_results.yaml", "plots.html", "optimization_history.png",
        "parallel_coordinate.png", "param_importances.png", "intermediate_values.png"]}

    # The sweep goes on and finds a better trial: the report is rebuilt over the old one.
    add(study, sweep_dir, p(5e-4, 32, "constant"), value=0.1, reports=((10, 0.3), (20, 0.1)))
    console = Console(record=True, width=200)
    report.build_report(sweep_dir, console=console)
    run = client.get_run(parent)
    assert run.data.tags["optuna.best_trial"] == "7"
    assert run.data.tags["best.network.dim"] == "32" and run.data.tags["best.scheduler"] == "constant"
    assert run.data.metrics["best_val_loss"] == pytest.approx(0.1)
    assert run.data.params["best.network.dim"] == "16"  # params are immutable: the tags hold the current best
    assert "tags best.*" in console.export_text()
    local = client.download_artifacts(parent, "report/optimization_results.yaml", str(tmp_path))
    assert yaml.safe_load(Path(local).read_text())["best"]["trial"] == 7
    assert not [f for f in os.listdir(sweep_dir / "report") if f.startswith(".")]
