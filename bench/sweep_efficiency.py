"""Benchmark (not a test; not run in CI): how much compute TPE + median pruning needs to match a grid.

On the embedded model, a 24-point grid over lr × dim × scheduler (every trial trains the full
``--steps``) against the lorasweep Optuna sweeper (TPE over the same knobs, lr on a log scale, median
pruning) given 25 % of the grid's total training steps, for 3 sampler seeds. The TPE sweep is grown one
trial at a time by resuming its study (``n_trials`` is the study total), so it stops exactly when the next
trial could overrun the step budget. Steps are counted from the study: a complete trial trained all its
steps, a pruned one as many as its last reported evaluation.

Prints a table and writes bench/results/sweep_efficiency.json.

    python bench/sweep_efficiency.py [--steps 100] [--seeds 0 1 2] [--budget 0.25]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
GRID = {"optimizer.lr": "choice(1e-4, 3e-4, 1e-3, 3e-3)", "network.dim": "choice(2, 8, 32)",
        "scheduler": "choice(constant, cosine)"}
TPE = {"optimizer.lr": "tag(log, interval(1e-4, 3e-3))", "network.dim": "choice(2, 8, 32)",
       "scheduler": "choice(constant, cosine)"}


def sweep(work: Path, name: str, space: dict[str, str], steps: int, *extra: str) -> float:
    """Run (or resume) one sweep in-process (basic launcher); returns its wall time."""
    args = [sys.executable, "-m", "lorasweep.cli", "train", "-m", "hydra/sweeper=lorasweep_optuna",
            "hydra/launcher=basic", f"hydra.sweep.dir={work / 'sweeps' / name}", f"hydra.sweeper.study_name={name}",
            f"output.root={work}", "tracking.enabled=false", "sampling.enabled=false",
            f"training.max_steps={steps}", f"validation.every_n_steps={steps // 5}", "hydra.sweeper.max_failures=100",
            *[f"{k}={v}" for k, v in space.items()], *extra]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=work, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    if proc.returncode:
        raise SystemExit(f"sweep {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def study_of(work: Path, name: str) -> optuna.Study:
    from lorasweep.sweeping.storage import SweepRecord, open_storage

    record = SweepRecord.read(work / "sweeps" / name)
    return optuna.load_study(study_name=record.study_name, storage=open_storage(record.storage))


def steps_used(study: optuna.Study, steps: int) -> int:
    total = 0
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            total += steps
        elif trial.intermediate_values:
            total += max(trial.intermediate_values)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="training steps of a full trial")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=0.25, help="TPE's share of the grid's total steps")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        grid_wall = sweep(work, "grid", GRID, args.steps, "hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=24")
        grid = study_of(work, "grid")  # read everything now: the journal goes with the temporary folder
        grid_best, grid_params, grid_trials = grid.best_value, grid.best_params, len(grid.trials)
        grid_steps = steps_used(grid, args.steps)
        budget = int(args.budget * grid_steps)
        rows = []
        for seed in args.seeds:
            name, n_trials, wall = f"tpe-{seed}", 3, 0.0
            common = ("hydra.sweeper.sampler=tpe", f"hydra.sweeper.seed={seed}", "hydra.sweeper.pruner=median",
                      "++hydra.sweeper.sampler_args={n_startup_trials:3}",
                      "++hydra.sweeper.pruner_args={n_startup_trials:2,n_warmup_steps:0}")
            wall += sweep(work, name, TPE, args.steps, *common, f"hydra.sweeper.n_trials={n_trials}")
            while steps_used(study_of(work, name), args.steps) + args.steps <= budget:
                n_trials += 1  # one more finished trial: resume the study
                wall += sweep(work, name, TPE, args.steps, *common, f"hydra.sweeper.n_trials={n_trials}")
            study = study_of(work, name)
            rows.append({"seed": seed, "best_val_loss": study.best_value, "best_params": study.best_params,
                         "steps": steps_used(study, args.steps), "trials": len(study.trials),
                         "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
                         "wall_s": round(wall, 1)})
    result = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "steps_per_trial": args.steps,
              "grid": {"best_val_loss": grid_best, "best_params": grid_params, "steps": grid_steps,
                       "trials": grid_trials, "wall_s": round(grid_wall, 1)},
              "budget_steps": budget, "tpe": rows}
    table = Table(title=f"grid (24 points) vs TPE + median pruning with {args.budget:.0%} of the grid's steps")
    for column in ("sweep", "best val_loss", "vs grid", "steps", "share of grid", "trials (pruned)", "wall"):
        table.add_column(column, justify="right")
    table.add_row("grid", f"{grid_best:.5f}", "", str(grid_steps), "100%", str(grid_trials),
                  f"{grid_wall:.0f} s")
    for row in rows:
        gap = 100 * (row["best_val_loss"] / grid_best - 1)
        table.add_row(f"tpe seed {row['seed']}", f"{row['best_val_loss']:.5f}", f"{gap:+.2f}%", str(row["steps"]),
                      f"{row['steps'] / grid_steps:.0%}", f"{row['trials']} ({row['pruned']})",
                      f"{row['wall_s']:.0f} s")
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep_efficiency.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
