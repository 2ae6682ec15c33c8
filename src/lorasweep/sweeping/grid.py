"""An in-memory Optuna study rebuilt from a grid sweep's run folders, so grids get the same report
(leaderboard, plots) as Optuna sweeps without a storage of their own."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from lorasweep.sweeping.storage import SweepRecord

_STATES = {"FINISHED": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED}


def _override_values(run_dir: Path, keys: list[str]) -> dict[str, Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    lines = [str(line) for line in OmegaConf.load(path)]
    values = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.key_or_group
        if key in keys:
            values[key] = override.value()
    return values


def study_from_runs(sweep_dir: Path, record: SweepRecord) -> optuna.Study:
    """One trial per job folder (``<sweep>/<job number>/run.json``), numbered by job, best = lowest val_loss."""
    runs = []
    for run_json in Path(sweep_dir).glob("*/run.json"):
        if run_json.parent.name.isdigit():
            runs.append((int(run_json.parent.name), run_json.parent, json.loads(run_json.read_text())))
    runs.sort(key=lambda item: item[0])
    values = {number: _override_values(folder, record.params) for number, folder, _ in runs}
    choices: dict[str, list[Any]] = {}
    for params in values.values():
        for key, value in params.items():
            if value not in choices.setdefault(key, []):
                choices[key].append(value)
    distributions = {key: CategoricalDistribution(options) for key, options in choices.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=record.study_name, directions=record.directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(record.objectives)
    for number, folder, run in runs:
        state = _STATES.get(str(run.get("status")), TrialState.FAIL)
        objective = run.get("objective")
        if state == TrialState.COMPLETE and objective is None:
            state = TrialState.FAIL
        params = values[number]
        attrs: dict[str, Any] = {"run_dir": str(folder.resolve()), "job_number": number}
        if (run.get("mlflow") or {}).get("run_id"):
            attrs["mlflow_run_id"] = run["mlflow"]["run_id"]
        if run.get("error"):
            attrs["error"] = run["error"]
        study.add_trial(optuna.trial.create_trial(
            state=state, value=objective if state == TrialState.COMPLETE else None, params=params,
            distributions={k: distributions[k] for k in params}, user_attrs=attrs,
            intermediate_values={int(step): float(v) for step, v in run.get("val_history", []) if int(step) > 0}))
    return study
