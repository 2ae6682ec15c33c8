"""``lorasweep ui``: the MLflow UI over lorasweep's default store, bound to localhost unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lorasweep.tracking.mlflow_run import default_tracking_uri


def ui_command(output_root: str, uri: str | None, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line: the store, and artifacts served from ``<output_root>/mlartifacts``."""
    root = Path(output_root)
    store = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", host,
           "--port", str(port), "--workers", "1"]
    if store.startswith("sqlite:"):
        cmd += ["--default-artifact-root", (root / "mlartifacts").resolve().as_uri()]
    return cmd


def run_ui(output_root: str, uri: str | None, host: str, port: int) -> int:
    root = Path(output_root)
    if uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "mlflow.db").exists():
            print(f"lorasweep: no runs in {root} yet; the UI starts on an empty store.", file=sys.stderr)
    cmd = ui_command(output_root, uri, host, port)
    print(f"MLflow UI: http://{host}:{port}  (store {cmd[cmd.index('--backend-store-uri') + 1]}; Ctrl-C stops)")
    try:
        # The UI needs no GenAI job runners (several busy processes); the user can still turn them on.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
