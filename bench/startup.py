"""Benchmark (not a test; not run in CI): how fast the commands that train nothing answer.

Each command runs ``--repeats`` times in a fresh process (``python -m lorasweep.cli``); the median wall time is
reported against the issue's target of 1.5 s for ``--help`` and config errors. Start-up cost is almost all
imports, so the tests pin the cause instead (tests/e2e/test_startup.py: no torch, diffusers, transformers,
peft, accelerate, mlflow or optuna on these paths).

Prints a table and writes bench/results/startup.json.

    python bench/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 1.5
COMMANDS = {
    "lorasweep --help": ["--help"],
    "lorasweep train --help": ["train", "--help"],
    "train: bad value (optimizer.lr=-1)": ["train", "optimizer.lr=-1"],
    "train: unknown key": ["train", "optimizer.nosuch=1"],
    "train: missing data folder": ["train", "data=folder", "data.train_dir=/nonexistent/images"],
    "sweep: bad value in a preset": ["sweep", "quickstart", "network.dim=-3"],
    "lorasweep cache info": ["cache", "info"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in COMMANDS.items():
            times, codes = [], set()
            for _ in range(args.repeats):
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "lorasweep.cli", *argv], cwd=tmp, capture_output=True,
                                      env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
                times.append(time.perf_counter() - start)
                codes.add(proc.returncode)
            rows.append({"command": name, "median_s": statistics.median(times), "min_s": min(times),
                         "exit_codes": sorted(codes)})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "target_s": TARGET_S, "repeats": args.repeats, "commands": rows}, indent=2))
    table = Table(title=f"start-up, median of {args.repeats} fresh processes (target ≤ {TARGET_S} s)")
    for column in ("command", "median s", "min s", "exit code", "target"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["command"], f"{row['median_s']:.2f}", f"{row['min_s']:.2f}",
                      ",".join(map(str, row["exit_codes"])), "ok" if row["median_s"] <= TARGET_S else "over")
    Console().print(table)


if __name__ == "__main__":
    main()
