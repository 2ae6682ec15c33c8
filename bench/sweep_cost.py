"""Benchmark (not a test; not run in CI): what a sweep costs beyond the training its trials do.

On the embedded model, an N-trial grid over the learning rate (``lorasweep train -m``, the
``lorasweep_process`` launcher, one slot) against the same N trials each run alone (``lorasweep train``, one
fresh process each, as a kohya-style trainer runs them). Every run reads the same data; the feature cache is
cleared before each half so both start cold.

Reported per trial (from run.json): wall time, training time, time from trial start to its first optimizer
step, whether the base model came from the worker's model cache, feature-cache hits/builds, and the
process's peak RSS. The headline ratio is the wall time from the end of the first trial to the end of the last
over the training time of those trials (target ≤ 1.1: a sweep costs what its trials train); the time until
the first trial is done (process starts, model load, latent/text cache build) and after the last (saving,
the report) are reported separately.

Prints a table and writes bench/results/sweep_cost.json.

    python bench/sweep_cost.py [--trials 8] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
LRS = ("1e-4", "2e-4", "3e-4", "5e-4", "7e-4", "1e-3", "2e-3", "3e-3", "5e-3", "7e-3", "1e-2", "2e-2")


def _common(root: Path, steps: int) -> list[str]:
    return [f"output.root={root}", "tracking.enabled=false", "sampling.enabled=false", f"training.max_steps={steps}",
            f"validation.every_n_steps={steps}"]


def _run(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lorasweep.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    if proc.returncode:
        raise SystemExit(f"lorasweep {' '.join(args[:3])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _clear_features(cache: Path) -> None:
    shutil.rmtree(cache / "features", ignore_errors=True)


def _last_metric_time(run_dir: Path) -> float:
    """Epoch seconds of the run's last metrics record (its final validation): when its training ended."""
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["time"]


def _trial_rows(run_dirs: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for run_dir in run_dirs:
        record = json.loads((run_dir / "run.json").read_text())
        rows.append({"run": run_dir.name, "wall_s": record["duration_s"], "train_s": record["train_time_s"],
                     "first_step_s": record.get("time_to_first_step_s"),
                     "model_cached": record.get("model_load", {}).get("cached"),
                     "model_load_s": record.get("model_load", {}).get("seconds"),
                     "features": record.get("feature_cache"), "peak_rss_mib": record.get("peak_rss_mib"),
                     "pid": record.get("model_load", {}).get("pid"), "ended_at": _last_metric_time(run_dir)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    lrs = LRS[:args.trials]
    from lorasweep.config.paths import cache_root

    cache = cache_root(None)
    with tempfile.TemporaryDirectory(prefix="lorasweep-sweep-cost-") as tmp:
        work = Path(tmp)
        _run(["train", *_common(work / "warm", 2)], work)  # builds the tiny model once, outside both timings

        _clear_features(cache)
        alone_root = work / "alone"
        alone_wall = [_run(["train", f"optimizer.lr={lr}", *_common(alone_root, args.steps)], work) for lr in lrs]
        alone = _trial_rows(sorted((alone_root / "runs").iterdir()))

        _clear_features(cache)
        sweep_dir = work / "sweep"
        sweep_start = time.time()
        sweep_wall = _run(["train", "-m", "hydra/launcher=lorasweep_process", f"hydra.sweep.dir={sweep_dir}",
                           f"optimizer.lr={','.join(lrs)}", *_common(work / "sweep-root", args.steps)], work)
        trials = _trial_rows([sweep_dir / str(i) for i in range(len(lrs))])

    first, rest = trials[0], trials[1:]
    first_done = first["ended_at"] - sweep_start  # controller + worker start, model load, caches, trial 0
    between = trials[-1]["ended_at"] - first["ended_at"]  # trials 1..N-1, back to back in one worker
    rest_train = sum(t["train_s"] for t in rest)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "trials": len(lrs), "steps": args.steps,
        "alone": {"wall_total_s": sum(alone_wall), "process_wall_s": alone_wall, "runs": alone},
        "sweep": {"wall_s": sweep_wall, "trials": trials},
        "ratio_trials_after_first_over_training": between / rest_train,
        "ratio_sweep_over_alone": sweep_wall / sum(alone_wall),
        "until_first_trial_done_s": first_done,
        "after_last_trial_s": sweep_start + sweep_wall - trials[-1]["ended_at"],  # saving, report, exit
        "peak_rss_mib_max": max(t["peak_rss_mib"] or 0 for t in trials),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep_cost.json").write_text(json.dumps(result, indent=2))

    table = Table(title=f"{len(lrs)} trials × {args.steps} steps, tiny model, {os.cpu_count()} CPUs")
    for column in ("run", "mode", "wall s", "train s", "to 1st step s", "model", "latents hit/built", "peak RSS MiB"):
        table.add_column(column)
    for mode, rows in (("alone", alone), ("sweep", trials)):
        for t in rows:
            feats = (t["features"] or {}).get("latents", {})
            table.add_row(t["run"][-12:], mode, f"{t['wall_s']:.1f}", f"{t['train_s']:.1f}",
                          f"{t['first_step_s']:.2f}" if t["first_step_s"] is not None else "-",
                          "cached" if t["model_cached"] else f"loaded {t['model_load_s']:.1f} s",
                          f"{feats.get('hits', 0)}/{feats.get('built', 0)}", f"{t['peak_rss_mib']:.0f}")
    console = Console()
    console.print(table)
    console.print(f"alone: {sum(alone_wall):.1f} s for {len(lrs)} processes; sweep: {sweep_wall:.1f} s "
                  f"({result['ratio_sweep_over_alone']:.2f}× of alone)")
    console.print(f"trials 2..{len(lrs)}: wall from trial 1's end to the last trial's end / their training time: "
                  f"{result['ratio_trials_after_first_over_training']:.3f} (target ≤ 1.1)")
    console.print(f"sweep start to the end of trial 1 (controller and worker start, model load, caches, trial 1): "
                  f"{first_done:.1f} s; after the last trial (save, report, exit): "
                  f"{result['after_last_trial_s']:.1f} s; "
                  f"peak RSS of the trial process: {result['peak_rss_mib_max']:.0f} MiB (target < 1536)")


if __name__ == "__main__":
    main()
