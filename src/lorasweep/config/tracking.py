"""The ``tracking`` group: the MLflow store, experiment and run name."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrackingConfig:
    """MLflow logging. One run = one MLflow run; its id is written into the run folder's ``run.json``."""

    enabled: bool = True
    """Log to MLflow. The run folder is written either way."""

    uri: str | None = None
    """Tracking URI; null = ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<output.root>/mlflow.db`` with artifacts
    under ``<output.root>/mlartifacts``. Any remote ``mlflow server`` URL works."""

    experiment: str = "lorasweep"
    """MLflow experiment name (created when missing)."""

    run_name: str | None = None
    """MLflow run name; null = the run folder's name."""

    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags set on the MLflow run."""

    retry_after_s: float = 20.0
    """While the tracking server does not answer mid-run, try it again at most this often (seconds). Training
    goes on meanwhile; each try can cost a few seconds of MLflow's own HTTP retries, so a small value slows
    training during an outage, a large one delays when queued metrics arrive after it."""

    tensorboard_dir: str | None = None
    """Also write TensorBoard event files (loss, learning rates, validation loss) into
    ``<tensorboard_dir>/<run name>``. Seed: ``log_dir``; kohya ``--logging_dir``."""

    def validate(self, key: str = "tracking") -> None:
        from lorasweep.config._checks import check_range

        check_range(f"{key}.retry_after_s", self.retry_after_s, low=0.0)
