"""The self-contained run folder (DESIGN §4): config, run record, log, metrics, samples, LoRA files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from lorasweep.liveness import process_identity
from lorasweep.tracking.files import atomic_write_json, atomic_write_text

PACKAGES = ("lorasweep", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "mlflow",
            "hydra-core", "omegaconf", "optuna", "numpy", "pillow")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the lorasweep source, when it runs from a git checkout."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                                    capture_output=True, text=True, timeout=5, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


@dataclass
class RunFolder:
    """Writes one run's files; ``run.json`` is rewritten atomically whenever the record changes."""

    path: Path
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for sub in ("lora", "samples"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.config_path, yaml_text, overwrite=False)

    def start_record(self, **fields: Any) -> None:
        self.record.update(status="RUNNING", started_at=_now(), host=platform.node(), pid=os.getpid(),
                           process=process_identity(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                           python=platform.python_version(), packages=package_versions(), git=git_state(),
                           **fields)
        self.save_record()

    def update_record(self, **fields: Any) -> None:
        self.record.update(fields)
        self.save_record()

    def save_record(self) -> None:
        atomic_write_json(self.path / "run.json", self.record)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        self._metrics.close()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))


def close_interrupted_run(run_dir: Path | None, reason: str, *, mlflow_run_id: str | None = None,
                          tags: dict[str, str] | None = None) -> None:
    """Give a run whose process died (SIGKILL, power loss) a final state: ``run.json`` status KILLED with
    ``reason``, its MLflow run KILLED (with ``tags``). A record that is already final is left alone."""
    import logging

    log = logging.getLogger(__name__)
    record_path = run_dir / "run.json" if run_dir is not None else None
    tracking_uri = None
    if record_path is not None and record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        tracking_uri = (record.get("mlflow") or {}).get("tracking_uri")
        mlflow_run_id = mlflow_run_id or (record.get("mlflow") or {}).get("run_id")
        if record.get("status") != "RUNNING":
            return
        record.update(status="KILLED", error=reason, finished_at=_now())
        atomic_write_json(record_path, record)
    if mlflow_run_id and tracking_uri:
        from mlflow import MlflowClient

        try:
            client = MlflowClient(tracking_uri=tracking_uri)
            for key, value in (tags or {}).items():
                client.set_tag(mlflow_run_id, key, value)
            client.set_tag(mlflow_run_id, "lorasweep.error", reason)
            client.set_terminated(mlflow_run_id, status="KILLED")
        except Exception as error:  # the tracking server may be gone; the run folder is what matters here
            log.warning("could not close MLflow run %s: %s", mlflow_run_id, error)
