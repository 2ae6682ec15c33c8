"""One MLflow run per training run, driven through ``MlflowClient`` (never the fluent global run), so an
inherited ``MLFLOW_RUN_ID`` or a parent process's active run cannot capture our logging (mlflow#15713)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorasweep.config.tracking import TrackingConfig
from lorasweep.tracking.redact import redact

MAX_PARAM_LENGTH = 6000
BATCH = 100


def tracking_uri(cfg: TrackingConfig, output_root: Path) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the sqlite store under ``output.root``."""
    import os

    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_tracking_uri(output_root)


def default_tracking_uri(output_root: Path) -> str:
    return f"sqlite:///{(output_root / 'mlflow.db').resolve()}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys for MLflow params; lists become their string form, long values are cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


class MlflowRun:
    """Params, buffered metrics, images and artifacts of one run; ``end`` sets the final status."""

    def __init__(self, cfg: TrackingConfig, output_root: Path, run_name: str, tags: dict[str, str], *,
                 resume_run_id: str | None = None) -> None:
        """Create a run, or with ``resume_run_id`` re-open that one (a resumed sweep's parent run)."""
        import mlflow
        from mlflow import MlflowClient

        self.uri = tracking_uri(cfg, output_root)
        self.client = MlflowClient(tracking_uri=self.uri)
        self._mlflow = mlflow
        self.experiment_id = self._experiment(cfg.experiment, output_root)
        if resume_run_id is None:
            self.run = self.client.create_run(self.experiment_id, run_name=cfg.run_name or run_name,
                                              tags=redact({**tags, **cfg.tags}))
        else:
            self.client.update_run(resume_run_id, status="RUNNING")
            self.run = self.client.get_run(resume_run_id)
        self.run_id: str = self.run.info.run_id
        self._pending: list[Any] = []

    def _experiment(self, name: str, output_root: Path) -> str:
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        artifact_location = None
        if self.uri == default_tracking_uri(output_root):
            artifact_location = (output_root / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except self._mlflow.exceptions.MlflowException:
            found = self.client.get_experiment_by_name(name)  # another process created it first
            if found is None:
                raise
            return found.experiment_id

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log ``params`` with secrets redacted (:mod:`lorasweep.tracking.redact`)."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in redact(params).items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in redact(tags).items():
            self.client.set_tag(self.run_id, key, value)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:1000], self._pending[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_image(self, image: Any, key: str, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def end(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
