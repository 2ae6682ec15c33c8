"""The MLflow parent run of a sweep and the sweep folder's ``sweep.json``.

One parent run per sweep folder: created when the sweep starts, re-opened (not duplicated) when the same
sweep is resumed, and closed with the sweep's status. Jobs find it through ``sweep.json`` in their sweep
folder, which works for every launcher (in-process, joblib workers, other machines on a shared disk).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from lorasweep.config.train import TrainConfig
from lorasweep.sweeping.storage import RECORD_FILE, SweepRecord
from lorasweep.tracking.mlflow_run import MlflowRun

log = logging.getLogger(__name__)


def read_record(sweep_dir: Path) -> SweepRecord | None:
    """The sweep folder's record, or None when there is none yet."""
    return SweepRecord.read(sweep_dir) if (Path(sweep_dir) / RECORD_FILE).is_file() else None


def open_parent(sweep_dir: Path, tc: TrainConfig, record: SweepRecord, *, params: Mapping[str, str],
                tags: Mapping[str, str]) -> SweepRecord:
    """Create or re-open the parent run, log ``params`` (once: MLflow params are immutable) and ``tags``, and
    write ``record`` (with the run's ids) to ``sweep.json``. With tracking off, only the record is written."""
    sweep_dir = Path(sweep_dir)
    previous = read_record(sweep_dir)
    if tc.tracking.enabled:
        resume = (previous.mlflow or {}).get("parent_run_id") if previous else None
        run = MlflowRun(tc.tracking, Path(tc.output.root), sweep_dir.name,
                        {"lorasweep.sweep": str(sweep_dir.resolve()), **tags}, resume_run_id=resume)
        if resume:
            log.info("re-opened the MLflow parent run %s of %s", resume, sweep_dir)
            run.set_tags(tags)
        logged = run.client.get_run(run.run_id).data.params
        run.log_params({k: v for k, v in params.items() if k not in logged})
        record.mlflow = {"tracking_uri": run.uri, "experiment_id": run.experiment_id, "parent_run_id": run.run_id}
    record.write(sweep_dir)
    return record


def close_parent(record: SweepRecord, status: str) -> None:
    """End the parent run with ``status`` (FINISHED, FAILED or KILLED)."""
    run_id = record.mlflow.get("parent_run_id")
    if not run_id:
        return
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=record.mlflow["tracking_uri"]).set_terminated(run_id, status=status)


def child_tags(sweep_dir: Path, job_num: int) -> dict[str, str]:
    """Tags that link a job's MLflow run to its sweep: parent run id, sweep folder, ``hydra.job.num``."""
    tags = {"lorasweep.sweep": str(Path(sweep_dir).resolve()), "hydra.job.num": str(job_num)}
    record = read_record(sweep_dir)
    if record is not None and record.mlflow.get("parent_run_id"):
        tags["mlflow.parentRunId"] = record.mlflow["parent_run_id"]
    return tags
