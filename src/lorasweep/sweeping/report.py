"""``lorasweep report``: the leaderboard, ``optimization_results.yaml`` and the plots of a sweep, read back from
its Optuna study, and their copy on the sweep's MLflow parent run.

Files (each written to a temporary name and renamed, so rebuilding a report never leaves a half-written file):

- ``<sweep>/optimization_results.yaml`` (at the sweep folder root, where Hydra's Optuna sweeper puts it): the
  study name, directions, objectives, the best trial (``best``; multi-objective: ``best_trials``, the Pareto
  front), the trial counts by state and ``n_trials``;
- ``<sweep>/report/leaderboard.csv``: one row per trial, best first (the columns of :func:`leaderboard`);
- ``<sweep>/report/plots.html``: every interactive (plotly) figure in one self-contained page, plotly.js inline
  once, so it opens offline; a figure that cannot be drawn is replaced by a short note saying why;
- ``<sweep>/report/*.png``: the same figures drawn with matplotlib.

MLflow params are immutable once logged, and a resumed sweep can change its best trial. So the parent run gets
the *current* best as tags (``optuna.best_trial`` and ``best.<param>``, rewritten at every report) and as
metrics (``best_<objective>``, logged at step = number of complete trials, so the latest value is the current
best); ``best.<param>`` params are logged when absent, kept when equal, and left as they are (with a note on the
console) when the best has changed since: for them the tags are authoritative.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasweep.errors import UserError
from lorasweep.sweeping.storage import SweepRecord, open_storage
from lorasweep.tracking.files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial
    from rich.console import Console

RESULTS_FILE = "optimization_results.yaml"
REPORT_DIR = "report"
LEADERBOARD_FILE = "leaderboard.csv"
HTML_FILE = "plots.html"
MAX_PARAM_LENGTH = 6000

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
# Columns around the objective values and the swept params, in this order:
# trial, state, <objectives...>, intermediate, <params...>, steps, duration_s, run_dir, mlflow_run_id, error
HEAD_COLUMNS = ("trial", "state")
MARK_COLUMN = "intermediate"
"""True when the objective value is the last intermediate value of a trial that did not complete (PRUNED)."""
TAIL_COLUMNS = ("steps", "duration_s", "run_dir", "mlflow_run_id", "error")

# (file stem, section title, optuna function name)
PLOTS = (
    ("optimization_history", "Optimization history", "plot_optimization_history"),
    ("parallel_coordinate", "Parallel coordinates", "plot_parallel_coordinate"),
    ("param_importances", "Parameter importances", "plot_param_importances"),
    ("intermediate_values", "Intermediate values", "plot_intermediate_values"),
)


# --------------------------------------------------------------------------------------------- leaderboard


def objective_names(study: optuna.Study, objectives: Sequence[str] | None = None) -> list[str]:
    """The names of the study's objectives: ``objectives`` when it has one per direction, else the study's
    metric names, else ``value`` (one objective) or ``value_0``, ``value_1``, ..."""
    n = len(study.directions)
    if objectives is not None and len(objectives) == n:
        return [str(name) for name in objectives]
    names = study.metric_names
    if names is not None and len(names) == n:
        return list(names)
    return ["value"] if n == 1 else [f"value_{i}" for i in range(n)]


def leaderboard_columns(names: Sequence[str], params: Sequence[str]) -> list[str]:
    """The keys of a leaderboard row (and the header of ``leaderboard.csv``)."""
    return [*HEAD_COLUMNS, *names, MARK_COLUMN, *params, *TAIL_COLUMNS]


def _signs(study: optuna.Study) -> list[float]:
    from optuna.study import StudyDirection

    return [-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in study.directions]


def _last_intermediate(trial: FrozenTrial) -> float | None:
    step = trial.last_step
    return None if step is None else float(trial.intermediate_values[step])


def _sort_value(value: float | None, sign: float) -> tuple[int, float]:
    """Smaller is better; missing or NaN values go last."""
    if value is None or math.isnan(value):
        return (1, 0.0)
    return (0, sign * value)


def _ordered_trials(study: optuna.Study, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    from optuna.trial import TrialState

    signs = _signs(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    others = [t for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)]

    def first_objective(t: FrozenTrial) -> tuple[tuple[int, float], int]:
        return _sort_value(t.values[0] if t.values else None, signs[0]), t.number

    if len(signs) > 1 and complete:
        front = {t.number for t in study.best_trials}
        complete.sort(key=lambda t: (t.number not in front, *first_objective(t)))
    else:
        complete.sort(key=first_objective)
    pruned.sort(key=lambda t: (_sort_value(_last_intermediate(t), signs[0]), t.number))
    others.sort(key=lambda t: t.number)
    return complete + pruned + others


def leaderboard(study: optuna.Study, params: Sequence[str], *,
                objectives: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per trial, best first: COMPLETE trials by objective (direction-aware; multi-objective: the
    Pareto front first, then by the first objective), then PRUNED trials by their last intermediate value
    (given as the objective value, with ``intermediate=True``), then FAIL/RUNNING/WAITING trials by number.

    Row keys: :func:`leaderboard_columns` — ``trial``, ``state``, one key per objective (named by
    ``objectives``, see :func:`objective_names`), ``intermediate``, each swept param (``None`` when the trial
    has no value for it), ``steps`` (last reported step), ``duration_s``, ``run_dir``, ``mlflow_run_id`` and
    ``error`` (FAIL trials)."""
    from optuna.trial import TrialState

    names = objective_names(study, objectives)
    rows: list[dict[str, Any]] = []
    for trial in _ordered_trials(study, study.get_trials(deepcopy=False)):
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        values: list[float | None] = [None] * len(names)
        intermediate = False
        if trial.state == TrialState.COMPLETE and trial.values is not None:
            values = [float(v) for v in trial.values]
        elif trial.state == TrialState.PRUNED and len(names) == 1:
            last = _last_intermediate(trial)
            if last is not None:
                values, intermediate = [last], True
        row.update(zip(names, values, strict=True))
        row[MARK_COLUMN] = intermediate
        for name in params:
            row[name] = trial.params.get(name)
        duration = trial.duration
        attrs = trial.user_attrs
        row.update(steps=trial.last_step,
                   duration_s=None if duration is None else round(duration.total_seconds(), 3),
                   run_dir=attrs.get("run_dir"), mlflow_run_id=attrs.get("mlflow_run_id"),
                   error=attrs.get("error"))
        rows.append(row)
    return rows


def _objective_keys(rows: Sequence[dict[str, Any]], params: Sequence[str]) -> list[str]:
    fixed = {*HEAD_COLUMNS, MARK_COLUMN, *params, *TAIL_COLUMNS}
    return [key for key in rows[0] if key not in fixed] if rows else []


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _fmt_dir(run_dir: Any, base: Path | None) -> str:
    if not run_dir:
        return "-"
    if base is not None:
        try:
            return str(Path(run_dir).relative_to(base))
        except ValueError:
            pass
    return str(run_dir)


def print_leaderboard(rows: Sequence[dict[str, Any]], params: Sequence[str], *, console: Console | None = None,
                      limit: int | None = 20, title: str | None = None, base: Path | None = None) -> None:
    """A rich table of the first ``limit`` rows (all when ``None``): trial, state, objective value(s) (a PRUNED
    trial's last intermediate value is shown with its step), the swept params and the run folder (relative to
    ``base`` when it is inside it)."""
    from rich.console import Console
    from rich.table import Table

    console = console or (Console() if Console().is_terminal else Console(width=160))
    if not rows:
        console.print(f"{title + ': ' if title else ''}no trials yet.")
        return
    names = _objective_keys(rows, params)
    table = Table(title=title, title_justify="left")
    table.add_column("trial", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for name in params:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("run folder", overflow="fold")
    styles = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}
    shown = rows if limit is None else rows[:limit]
    for index, row in enumerate(shown):
        cells = [str(row["trial"]), f"[{styles.get(row['state'], 'dim')}]{row['state']}[/]"]
        for name in names:
            text = _fmt(row.get(name))
            if row.get(MARK_COLUMN) and row.get(name) is not None:
                text += f" (step {row.get('steps')})"
            cells.append(text)
        cells.extend(_fmt(row.get(name)) for name in params)
        cells.append(_fmt_dir(row.get("run_dir"), base))
        table.add_row(*cells, style="bold" if index == 0 and row["state"] == "COMPLETE" else None)
    console.print(table)
    if len(rows) > len(shown):
        console.print(f"... and {len(rows) - len(shown)} more trials (see {LEADERBOARD_FILE}).")


# ------------------------------------------------------------------------------------------------ results


def _plain(value: Any) -> Any:
    """A YAML/CSV-friendly scalar (numpy scalars become Python ones)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return str(value)
    return value


def _trial_summary(trial: FrozenTrial, names: Sequence[str], params: Sequence[str]) -> dict[str, Any]:
    keys = list(params) + [k for k in trial.params if k not in params]
    summary: dict[str, Any] = {"trial": trial.number}
    values = [float(v) for v in trial.values or []]
    if len(values) == 1:
        summary["value"] = values[0]
    summary["values"] = dict(zip(names, values, strict=False))
    summary["params"] = {k: _plain(trial.params[k]) for k in keys if k in trial.params}
    summary["run_dir"] = trial.user_attrs.get("run_dir")
    summary["mlflow_run_id"] = trial.user_attrs.get("mlflow_run_id")
    return summary


def _best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (single objective) or the Pareto front sorted by the first objective; [] when none."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    sign = _signs(study)[0]
    return sorted(study.best_trials, key=lambda t: (_sort_value(t.values[0], sign), t.number))


def results(study: optuna.Study, record: SweepRecord) -> dict[str, Any]:
    """The content of ``optimization_results.yaml``."""
    names = objective_names(study, record.objectives)
    trials = study.get_trials(deepcopy=False)
    counts = {state: 0 for state in STATES}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    best = [_trial_summary(t, names, record.params) for t in _best_trials(study)]
    data: dict[str, Any] = {
        "name": study.study_name,
        "storage": record.storage,
        "directions": [d.name.lower() for d in study.directions],
        "objectives": names,
    }
    if len(study.directions) == 1:
        data["best"] = best[0] if best else None
        # Hydra's Optuna sweeper's keys, for tools that read them:
        data["best_params"] = dict(best[0]["params"]) if best else None  # a copy: no YAML anchor
        data["best_value"] = best[0]["value"] if best else None
    else:
        data["best_trials"] = best
    data["counts"] = counts
    data["n_trials"] = len(trials)
    return data


def _csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else _plain(row.get(k)) for k in columns})
    return buffer.getvalue()


def write_leaderboard_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> Path:
    atomic_write_text(path, _csv_text(rows, columns))
    return path


def write_results(study: optuna.Study, record: SweepRecord, sweep_dir: Path, *,
                  rows: Sequence[dict[str, Any]] | None = None) -> Path:
    """Write ``<sweep_dir>/optimization_results.yaml`` and ``<sweep_dir>/report/leaderboard.csv``; return the
    YAML's path. ``rows`` (from :func:`leaderboard`) saves reading the trials twice."""
    import yaml

    sweep_dir = Path(sweep_dir)
    report_dir = sweep_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    names = objective_names(study, record.objectives)
    if rows is None:
        rows = leaderboard(study, record.params, objectives=names)
    write_leaderboard_csv(rows, leaderboard_columns(names, record.params), report_dir / LEADERBOARD_FILE)
    path = sweep_dir / RESULTS_FILE
    atomic_write_text(path, yaml.safe_dump(results(study, record), sort_keys=False, allow_unicode=True))
    return path


# -------------------------------------------------------------------------------------------------- plots


def _plot_problems(study: optuna.Study, params: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The params that can be plotted, and why each plot cannot be made (by file stem)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    seen = [p for p in params if any(p in t.params for t in complete)]
    seen += sorted({k for t in complete for k in t.params} - set(seen))  # params the record does not name
    problems: dict[str, str] = {}
    if not complete:
        reason = "no trial has completed yet."
        problems.update(optimization_history=reason, parallel_coordinate=reason, param_importances=reason)
    elif not seen:
        problems["parallel_coordinate"] = problems["param_importances"] = "the trials have no swept parameters."
    if "param_importances" not in problems:
        varying = [p for p in seen if len({repr(t.params.get(p)) for t in complete if p in t.params}) > 1]
        if len(complete) < 2:
            problems["param_importances"] = "importances need at least 2 complete trials."
        elif not varying:
            problems["param_importances"] = "no swept parameter varies across the complete trials."
    reported = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    if len(study.directions) > 1:
        problems["intermediate_values"] = "multi-objective studies have no intermediate values."
    elif not reported:
        problems["intermediate_values"] = "no trial has reported intermediate values."
    return seen, problems


def _plot_kwargs(name: str, study: optuna.Study, params: list[str], target_name: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if name != "plot_intermediate_values":
        kwargs["target_name"] = target_name
        if len(study.directions) > 1:
            target: Callable[[FrozenTrial], float] = lambda t: t.values[0]  # noqa: E731
            kwargs["target"] = target
    if name in ("plot_parallel_coordinate", "plot_param_importances"):
        kwargs["params"] = params
    return kwargs


def _save_png(name: str, study: optuna.Study, kwargs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    with matplotlib.rc_context():  # optuna's matplotlib plots set the ggplot style globally
        before = set(plt.get_fignums())
        try:
            axes = getattr(ovm, name)(study, **kwargs)
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            figure = first.get_figure()
            figure.set_size_inches(10, 6)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            atomic_write_bytes(path, buffer.getvalue())
        finally:
            for number in set(plt.get_fignums()) - before:
                plt.close(number)


def _html_page(title: str, sections: list[tuple[str, str]]) -> str:
    import html

    from plotly.offline import get_plotlyjs

    body = "\n".join(f'<section>\n<h2>{html.escape(heading)}</h2>\n{content}\n</section>'
                     for heading, content in sections)
    return (f'<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            '<style>body{font-family:sans-serif;margin:2em;} .note{color:#a15c00;}</style>\n'
            f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n<body>\n'
            f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n")


def write_plots(study: optuna.Study, out_dir: Path, *, params: Sequence[str],
                objectives: Sequence[str] | None = None) -> list[Path]:
    """Optimization history, parallel coordinates, parameter importances and intermediate values: one
    self-contained ``plots.html`` (plotly, plotly.js inline once) and one PNG per figure (matplotlib). A figure
    that cannot be made is skipped (no PNG) with a note in the HTML saying why. Multi-objective studies are
    plotted against their first objective. Returns the files written."""
    import html

    import optuna.visualization as ov
    from optuna.exceptions import ExperimentalWarning

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = objective_names(study, objectives)
    target_name = names[0]
    plot_params, problems = _plot_problems(study, params)
    sections: list[tuple[str, str]] = []
    written: list[Path] = []
    for stem, heading, name in PLOTS:
        if stem in problems:
            sections.append((heading, f'<p class="note">Not drawn: {html.escape(problems[stem])}</p>'))
            (out_dir / f"{stem}.png").unlink(missing_ok=True)  # a stale one from an earlier report
            continue
        kwargs = _plot_kwargs(name, study, plot_params, target_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                figure = getattr(ov, name)(study, **kwargs)
                sections.append((heading, figure.to_html(full_html=False, include_plotlyjs=False)))
            except Exception as error:  # a plot must never break the report
                sections.append((heading, f'<p class="note">Not drawn: {html.escape(_short(error))}</p>'))
                (out_dir / f"{stem}.png").unlink(missing_ok=True)
                continue
            png = out_dir / f"{stem}.png"
            try:
                _save_png(name, study, kwargs, png)
                written.append(png)
            except Exception as error:
                png.unlink(missing_ok=True)
                sections[-1] = (heading, sections[-1][1]
                                + f'\n<p class="note">No PNG: {html.escape(_short(error))}</p>')
    page = out_dir / HTML_FILE
    atomic_write_text(page, _html_page(f"Sweep {study.study_name}", sections))
    return [page, *written]


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------------------- MLflow


def log_report_to_mlflow(study: optuna.Study, record: SweepRecord, files: Sequence[Path], *,
                  console: Console | None = None) -> list[str]:
    """Put the best trial and the report files on the sweep's MLflow parent run (see the module docstring
    for how a changed best is handled). Returns notes for the user (empty when all went as planned); an
    unreachable or deleted run is a note, not an error: the local report stands on its own."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from optuna.trial import TrialState

    run_id = record.mlflow.get("parent_run_id")
    uri = record.mlflow.get("tracking_uri")
    notes: list[str] = []
    if not run_id:
        return notes
    names = objective_names(study, record.objectives)
    try:
        client = MlflowClient(tracking_uri=uri)
        existing = client.get_run(run_id).data.params
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = _best_trials(study)
        params: list[Param] = []
        tags: list[RunTag] = [RunTag("optuna.n_complete", str(len(complete))),
                              RunTag("optuna.n_trials", str(len(study.get_trials(deepcopy=False))))]
        metrics: list[Metric] = []
        if best:
            import time

            now = int(time.time() * 1000)
            signs = _signs(study)
            for i, name in enumerate(names):  # multi-objective: each objective's best over the Pareto front
                value = min((t.values[i] for t in best), key=lambda v: signs[i] * v)
                metrics.append(Metric(f"best_{name}", float(value), now, len(complete)))
            if len(best) == 1:
                trial = best[0]
                tags.append(RunTag("optuna.best_trial", str(trial.number)))
                stale = []
                for key, value in trial.params.items():
                    text = str(_plain(value))[:MAX_PARAM_LENGTH]
                    tags.append(RunTag(f"best.{key}", text))
                    if f"best.{key}" not in existing:
                        params.append(Param(f"best.{key}", text))
                    elif existing[f"best.{key}"] != text:
                        stale.append(f"best.{key}")
                if stale:
                    notes.append(f"MLflow params {', '.join(stale)} keep an earlier best (params cannot change); "
                                 f"the current best (trial {trial.number}) is in the tags best.*.")
            else:
                tags.append(RunTag("optuna.best_trials", ",".join(str(t.number) for t in best)))
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path=REPORT_DIR)
    except (MlflowException, OSError) as error:
        notes.append(f"could not log the report to MLflow run {run_id} at {uri}: {_short(error)}")
    if console is not None:
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
    return notes


# ------------------------------------------------------------------------------------------------- report


def load_study(record: SweepRecord, sweep_dir: Path) -> optuna.Study:
    """The sweep's study; a grid sweep (no storage) gets one rebuilt in memory from its run folders."""
    import optuna

    if not record.storage:
        from lorasweep.sweeping.grid import study_from_runs

        return study_from_runs(sweep_dir, record)
    storage = open_storage(record.storage, key=str(Path(sweep_dir) / "sweep.json"))
    try:
        return optuna.load_study(study_name=record.study_name, storage=storage)
    except KeyError:
        raise UserError(str(Path(sweep_dir) / "sweep.json"),
                        f"names the study {record.study_name!r}, which is not in the storage {record.storage}.",
                        "Check that the storage is the one the sweep used (it may have been moved or deleted).") \
            from None


def build_report(sweep_dir: Path, *, log_to_mlflow: bool = True, console: Console | None = None) -> Path:
    """Read ``<sweep_dir>/sweep.json``, load the study, print the leaderboard, write
    ``<sweep_dir>/optimization_results.yaml`` and ``<sweep_dir>/report/`` (``leaderboard.csv``, ``plots.html``,
    PNGs) and, when the sweep has an MLflow parent run and ``log_to_mlflow``, log the best trial and these
    files to it. Safe to run again (e.g. after a resumed sweep): every file is replaced atomically. Returns the
    report folder."""
    from rich.console import Console

    console = console or (Console() if Console().is_terminal else Console(width=160))
    sweep_dir = Path(sweep_dir).resolve()
    record = SweepRecord.read(sweep_dir)
    study = load_study(record, sweep_dir)
    names = objective_names(study, record.objectives)
    rows = leaderboard(study, record.params, objectives=names)
    print_leaderboard(rows, record.params, console=console, title=f"Sweep {study.study_name}", base=sweep_dir)
    report_dir = sweep_dir / REPORT_DIR
    results_path = write_results(study, record, sweep_dir, rows=rows)
    plots = write_plots(study, report_dir, params=record.params, objectives=names)
    if log_to_mlflow and record.mlflow.get("parent_run_id"):
        log_report_to_mlflow(study, record, [report_dir / LEADERBOARD_FILE, results_path, *plots], console=console)
    console.print(f"Report: {report_dir} ({HTML_FILE}, {LEADERBOARD_FILE}); results: {results_path}")
    return report_dir
