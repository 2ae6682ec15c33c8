"""Benchmark of the default run (not a test; not run in CI).

Measures, on this machine:
  * wall time of `lorasweep train` with a cold cache (builds the tiny model and the synthetic data, as the
    README's first command does after install) and with a warm cache;
  * start and end validation loss for optimizer.lr in {1e-5, the default, 1e-1};
  * how much the default run's LoRA changes its samples (mean absolute pixel difference, 0–255, between the
    step-0 sample, the base alone, and the final one, per prompt × seed).
Prints a table and writes bench/results/default_run.json.

    python bench/default_run.py [--keep-cache DIR]
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

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def train(cwd: Path, cache: Path, *overrides: str) -> tuple[float, dict]:
    env = {**os.environ, "LORASWEEP_CACHE_DIR": str(cache), "MLFLOW_DISABLE_TELEMETRY": "true"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lorasweep.cli", "train", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"lorasweep train {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    run_dir = max((cwd / "outputs" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    record = json.loads((run_dir / "run.json").read_text())
    record["run_dir"] = str(run_dir)
    return wall, record


def sample_changes(run_dir: Path) -> dict[str, float]:
    """Mean |final − step-0| per sample image, in 0–255 pixel units."""
    import numpy as np
    from PIL import Image

    folders = sorted(p for p in (run_dir / "samples").iterdir() if p.is_dir())
    changes = {}
    for before in sorted(folders[0].glob("*.png")):
        pixels = [np.asarray(Image.open(f / before.name).convert("RGB"), dtype=np.float64)
                  for f in (folders[0], folders[-1])]
        changes[before.name] = round(float(np.abs(pixels[0] - pixels[1]).mean()), 1)
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-cache", type=Path, default=None, help="use (and keep) this cache folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = args.keep_cache or work / "cache"
        cold_wall, cold = train(work, cache)
        warm_wall, warm = train(work, cache)
        changes = sample_changes(Path(warm["run_dir"]))
        lr_rows = []
        for lr in ("1e-5", None, "1e-1"):
            overrides = [] if lr is None else [f"optimizer.lr={lr}"]
            rec = warm if lr is None else train(work, cache, *overrides)[1]
            lr_rows.append({"lr": lr or "default", "val_loss_start": rec["val_loss_start"],
                            "val_loss_end": rec["val_loss"]})
    result = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})",
              "cold_cache_wall_s": round(cold_wall, 1), "warm_cache_wall_s": round(warm_wall, 1),
              "default_val_loss_start": warm["val_loss_start"], "default_val_loss_end": warm["val_loss"],
              "reproducible_cold_vs_warm": cold["val_loss"] == warm["val_loss"], "lr": lr_rows,
              "sample_change_0_255": changes}
    console = Console()
    table = Table(title="lorasweep train (embedded default)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("wall time, cold cache (model build + data + train)", f"{result['cold_cache_wall_s']} s")
    table.add_row("wall time, warm cache", f"{result['warm_cache_wall_s']} s")
    for row in lr_rows:
        drop = 100 * (1 - row["val_loss_end"] / row["val_loss_start"])
        table.add_row(f"val_loss lr={row['lr']}", f"{row['val_loss_start']:.5f} → {row['val_loss_end']:.5f} "
                      f"({drop:+.1f}% fall)")
    for name, change in changes.items():
        table.add_row(f"sample change, base → base+LoRA: {name}", f"{change} / 255")
    table.add_row("cold and warm runs give the same val_loss", str(result["reproducible_cold_vs_warm"]))
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_run.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
