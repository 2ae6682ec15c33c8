"""One MLflow run per training run, driven through ``MlflowClient`` (never the fluent global run), so an
inherited ``MLFLOW_RUN_ID`` or a parent process's active run cannot capture our logging (mlflow#15713).

A tracking server that goes away mid-run must not stop training: the run folder is the record of truth and
MLflow a copy. Once the run exists, a failed call starts an *outage*: metrics stay queued (in order, with
their steps) and are sent when the server answers again; images and artifacts that could not be sent are
counted (the run folder has them). During an outage a call is retried at most every
``tracking.retry_after_s`` seconds, and MLflow's own HTTP retries are kept short, so training loses seconds,
not minutes.
:meth:`MlflowRun.report` says what never arrived; the job writes it to ``run.json``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lorasweep.config.tracking import TrackingConfig
from lorasweep.tracking.redact import redact

MAX_PARAM_LENGTH = 6000
BATCH = 100
#: MLflow's HTTP retry defaults (7 retries, backoff factor 2, 120 s timeout) hold a failing call for minutes.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

log = logging.getLogger(__name__)


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

        for name, value in HTTP_RETRY_DEFAULTS.items():  # the user's own settings win
            os.environ.setdefault(name, value)
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
        self.retry_after_s = cfg.retry_after_s
        self._pending: list[Any] = []
        self._retry_at = 0.0
        self.outage: str | None = None
        """The error of the ongoing outage; None while the server answers."""
        self.outages = 0
        self.unsent: dict[str, int] = {"images": 0, "artifacts": 0, "tags": 0}
        self.status_set = False

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

    def _send(self, call: Callable[..., Any], *args: Any, force: bool = False, **kwargs: Any) -> bool:
        """One client call; False when the server did not take it (an outage starts or goes on)."""
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        if self.outage is not None and not force and time.monotonic() < self._retry_at:
            return False
        try:
            call(*args, **kwargs)
        except (MlflowException, RequestException, OSError) as exc:
            if self.outage is None:
                self.outages += 1
                log.warning("MLflow at %s stopped answering (%s); training goes on, metrics are queued and "
                            "the run folder keeps everything", self.uri, str(exc).splitlines()[0][:300])
            self.outage = str(exc).splitlines()[0][:500]
            self._retry_at = time.monotonic() + self.retry_after_s
            return False
        if self.outage is not None:
            log.warning("MLflow at %s answers again; sending %d queued metric values", self.uri, len(self._pending))
            self.outage = None
        return True

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log ``params`` with secrets redacted (:mod:`lorasweep.tracking.redact`). Called at the start, where
        an unreachable server is the user's to fix, so errors propagate."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in redact(params).items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in redact(tags).items():
            if not self._send(self.client.set_tag, self.run_id, key, value):
                self.unsent["tags"] += 1

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self, *, force: bool = False) -> None:
        """Send queued metrics; during an outage only every ``retry_after_s`` (or when ``force``)."""
        while self._pending:
            chunk = self._pending[:1000]
            if not self._send(self.client.log_batch, self.run_id, metrics=chunk, force=force):
                return
            self._pending = self._pending[len(chunk):]
            force = False  # the server answered: no reason to skip the rest

    def log_image(self, image: Any, key: str, step: int) -> None:
        if not self._send(self.client.log_image, self.run_id, image, key=key, step=step):
            self.unsent["images"] += 1

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file; mid-outage only when a retry is due (the end of a run uploads several, and each try
        at a server that is gone costs seconds)."""
        if not self._send(self.client.log_artifact, self.run_id, str(path), artifact_path=artifact_path):
            self.unsent["artifacts"] += 1

    def end(self, status: str) -> None:
        """Send what is queued and set the final status (one last try each, even mid-outage)."""
        self.flush(force=True)
        self.status_set = self._send(self.client.set_terminated, self.run_id, status=status, force=True)

    def report(self) -> dict[str, Any]:
        """What the tracking server missed: ``complete`` is true when it has everything, status included."""
        unsent = {"metrics": len(self._pending), **self.unsent}
        return {"uri": self.uri, "outages": self.outages, "complete": not any(unsent.values()) and self.status_set,
                "unsent": unsent, "status_set": self.status_set, "last_error": self.outage}
