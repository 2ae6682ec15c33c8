"""One training run from a composed config: the contract between Hydra (or ``reproduce``) and the trainer.

``run_job`` creates nothing before every input has been checked, writes the run folder, mirrors everything
to MLflow, trains, saves the LoRA, and returns the objective (the final validation loss).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from lorasweep import _faults
from lorasweep.config.paths import cache_root
from lorasweep.config.train import TrainConfig, to_train_config
from lorasweep.config.validation import TIMESTEP_METRIC_PREFIX, timestep_metric
from lorasweep.data.buckets import make_buckets
from lorasweep.data.dataset import ImageItem, fit_item, scan_folder, split_validation
from lorasweep.errors import UserError
from lorasweep.tracking.console import TrainProgress, attach_log_handlers, detach_log_handlers, make_console
from lorasweep.tracking.files import atomic_write_text
from lorasweep.tracking.mlflow_run import MlflowRun, flatten
from lorasweep.tracking.run_folder import RunFolder

if TYPE_CHECKING:
    from lorasweep.evaluation.samples import Sample
    from lorasweep.sweeping.trial import TrialReporter
    from lorasweep.tracking.tensorboard import TensorBoardLog
    from lorasweep.training.loop import Plan

log = logging.getLogger(__name__)

SYNTHETIC_DIR = "data/synthetic-zorb"
TRACKING_CHECK_TIMEOUT_S = 5.0
"""How long preflight waits for a tracking server to answer before refusing the run."""


@dataclass(frozen=True)
class CheckedInputs:
    """Everything ``preflight`` established, reused by the run so nothing is scanned twice."""

    config: TrainConfig
    train_dir: Path
    train_items: list[ImageItem]
    val_items: list[ImageItem]
    missing_captions: int
    reg_items: tuple[ImageItem, ...] = ()
    resume_forced: tuple[str, ...] = ()
    """With ``resume.force``: what differs from the saved state's config and data set."""

    @property
    def data_digest(self) -> str:
        from lorasweep.training.state import data_fingerprint

        return data_fingerprint([*self.train_items, *self.reg_items])


#: What a job returns to a sweeper, and so the metrics a sweep may optimise (``hydra.sweeper.objective``).
OBJECTIVES: dict[str, str] = {
    "val_loss": "final deterministic validation loss (lower is better)",
    "val_loss_drop": "relative fall of the validation loss from step 0, 1 - end/start (higher is better)",
    "steps_per_s": "optimizer steps per second of training wall time, evaluations included (higher is better)",
    "train_time_s": "wall time of the training loop in seconds (lower is better)",
}


def objective_names(timesteps: Iterable[int]) -> dict[str, str]:
    """:data:`OBJECTIVES` and ``val_loss/t<t>`` for each of the run's validation timesteps."""
    return {**OBJECTIVES, **{timestep_metric(t): f"final validation loss at timestep {t} alone (lower is better)"
                             for t in timesteps}}


def reported_while_running(objective: str) -> bool:
    """Whether trials report ``objective`` at every evaluation (so a pruner can act on it)."""
    return objective == "val_loss" or objective.startswith(TIMESTEP_METRIC_PREFIX)


@dataclass(frozen=True)
class JobResult:
    run_dir: Path
    val_loss_start: float
    val_loss: float
    lora_path: Path
    mlflow_run_id: str | None
    tracking_uri: str | None
    train_time_s: float = float("nan")
    steps: int = 0
    val_per_timestep: dict[int, float] = field(default_factory=dict)

    @property
    def objectives(self) -> dict[str, float]:
        """Every metric in :func:`objective_names` for this run."""
        return {"val_loss": self.val_loss, "val_loss_drop": 1.0 - self.val_loss / self.val_loss_start,
                "steps_per_s": self.steps / self.train_time_s, "train_time_s": self.train_time_s,
                **{timestep_metric(t): v for t, v in self.val_per_timestep.items()}}


def resolve_train_dir(cfg: TrainConfig) -> Path:
    """``data.train_dir``, or the built-in synthetic concept set (generated once into the cache)."""
    if cfg.data.train_dir:
        return Path(cfg.data.train_dir).expanduser()
    from lorasweep.data.synthetic import write_concept_dataset

    return write_concept_dataset(cache_root(cfg.model.cache_dir) / SYNTHETIC_DIR)


def check_writable_dir(key: str, folder: Path, hint: str) -> None:
    """Refuse ``folder`` (named by config key ``key``) unless it is, or could be created as, a folder this user
    can write to. Nothing is created: a run that is refused leaves no trace."""
    existing = folder
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: creating the folder would fail
            raise UserError(key, f"{folder} is not writable: {existing} is a broken symbolic link.", hint)
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(key, f"{folder} is not writable: {existing} is a file, not a folder.", hint)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(key, f"{folder} is not writable: {existing} does not let this user create files.", hint)


def check_output_root(root: Path) -> None:
    check_writable_dir("output.root", root, "Choose a folder you can write to with `output.root=<path>`.")


def _check_output_folders(tc: TrainConfig) -> None:
    """``output.root`` and every other folder a run writes into, before anything is written."""
    check_output_root(Path(tc.output.root))
    for key, value in (("output.export_dir", tc.output.export_dir),
                       ("tracking.tensorboard_dir", tc.tracking.tensorboard_dir),
                       ("legacy.save_json_folder", tc.legacy.save_json_folder)):
        if value:
            check_writable_dir(key, Path(value).expanduser(), f"Choose a folder you can write to with `{key}=<path>`, "
                               "or leave it null.")


def _check_init_weights(tc: TrainConfig) -> None:
    """``network.init_weights``: a readable kohya/LyCORIS file of this network's algorithm and ranks (header
    only, cheap); a damaged file or the wrong rank would otherwise stop the run after the base model has loaded."""
    if tc.network.init_weights:
        from lorasweep.network.kohya import check_lora_header

        check_lora_header(Path(tc.network.init_weights).expanduser(), tc.network)


def check_tracking_uri(tc: TrainConfig) -> None:
    """The MLflow store answers (an ``http(s)`` server) or can be created (a ``sqlite`` file, a local folder),
    without importing MLflow: an unreachable store would otherwise fail after the run folder exists. The
    default (``<output.root>/mlflow.db``) is covered by the ``output.root`` check."""
    from urllib.parse import urlsplit, urlunsplit

    if not tc.tracking.enabled:
        return
    if tc.tracking.uri:
        key, uri = "tracking.uri", tc.tracking.uri
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        key, uri = "MLFLOW_TRACKING_URI (environment)", os.environ["MLFLOW_TRACKING_URI"]
    else:
        return
    off = "or set tracking=off (tracking.enabled=false) to train without MLflow."
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        from lorasweep.tracking.redact import redact_value

        shown = redact_value(uri, [])
        try:  # credentials stay out of the request and the message
            shown = urlunsplit((parts.scheme, (parts.hostname or "") + (f":{parts.port}" if parts.port else ""),
                                parts.path, "", ""))
            with urllib.request.urlopen(f"{shown.rstrip('/')}/health", timeout=TRACKING_CHECK_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            return  # it answers (perhaps asking for credentials): a server is there
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise UserError(key, f"the MLflow server {shown} cannot be reached ({reason}).",
                            f"Start it (`mlflow server --host 127.0.0.1 --port <port>`), fix the URI, {off}") from None
        return
    if scheme == "sqlite":
        database = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        if not database or database == ":memory:":
            return
        path = Path(database)
        if path.is_dir():
            raise UserError(key, f"{path} is a folder; a sqlite tracking URI names the database file.",
                            f"Use e.g. `tracking.uri=sqlite:///{path / 'mlflow.db'}`, {off}")
        if not path.parent.exists():
            raise UserError(key, f"the folder {path.parent} of the sqlite database {path.name} does not exist.",
                            f"Create it, point the URI at an existing folder (sqlite:////abs/path/mlflow.db), "
                            f"leave tracking.uri null for <output.root>/mlflow.db, {off}")
        check_writable_dir(key, path.parent, f"Point the URI at a folder you can write to, {off}")
        return
    if scheme in ("", "file"):
        check_writable_dir(key, Path(parts.path if scheme else uri).expanduser(),
                           f"Point it at a folder you can write to, {off}")


def preflight(cfg: DictConfig | TrainConfig) -> CheckedInputs:
    """Every check that can fail on user input, before any folder, MLflow run or model load exists."""
    from lorasweep.data.captions import check_keep_tokens
    from lorasweep.models.loading import resolve_base

    tc = cfg if isinstance(cfg, TrainConfig) else to_train_config(cfg)
    resolve_base(tc.model)
    _check_output_folders(tc)
    check_tracking_uri(tc)
    train_dir = resolve_train_dir(tc)
    scan = scan_folder(train_dir, tc.data.caption_extension)
    reg_items: list[ImageItem] = []
    if tc.data.reg_dir:
        reg_items = scan_folder(Path(tc.data.reg_dir).expanduser(), tc.data.caption_extension, "data.reg_dir",
                                is_reg=True).items
    check_keep_tokens(scan.items, tc.data)
    _check_init_weights(tc)
    buckets = make_buckets(tc.data.size, tc.data.buckets)
    for item in [*scan.items, *reg_items]:
        fit_item(item, tc.data, buckets)  # a too-small image fails here, before any folder exists
    # Regularisation images are never held out: the validation loss measures the concept being learned.
    train_items, val_items = split_validation(scan.items, tc.validation.split, tc.validation.seed)
    checked = CheckedInputs(tc, train_dir, train_items, val_items, scan.missing_captions, tuple(reg_items))
    if tc.resume.state_dir:
        from lorasweep.training.state import load_state_meta

        meta = load_state_meta(Path(tc.resume.state_dir).expanduser(), tc, checked.data_digest)
        if meta.get("forced"):
            checked = replace(checked, resume_forced=tuple(meta["forced"]))
    return checked


def run_job(cfg: DictConfig, run_dir: Path, *, tags: dict[str, str] | None = None,
            checked: CheckedInputs | None = None, show_progress: bool = True) -> JobResult:
    """Train one LoRA into ``run_dir`` (which must be new and otherwise empty but for Hydra's ``.hydra/``).

    In a sweep, ``tags`` carry the cross-links (``mlflow.parentRunId``, ``lorasweep.sweep``,
    ``hydra.job.num``); a config with an active ``trial`` node also reports to its Optuna trial, which
    may stop the run early by raising ``optuna.TrialPruned`` (the run then ends PRUNED, MLflow KILLED).
    """
    import optuna

    from lorasweep.data.tags import format_tag_frequency, tag_frequency
    from lorasweep.models.cache import acquire as acquire_model
    from lorasweep.models.cache import release as release_model
    from lorasweep.network.kohya import save_lora
    from lorasweep.network.metadata import TrainingFacts, kohya_metadata
    from lorasweep.training.loop import lora_file_path, pick_device, train
    from lorasweep.training.state import load_state

    job_start = time.perf_counter()
    checked = checked or preflight(cfg)
    tc = checked.config
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    output_root = Path(tc.output.root)
    folder = RunFolder(run_dir)
    folder.write_config(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    console = make_console()
    handlers = attach_log_handlers(folder.log_path, console)
    started = time.time()
    frequency = tag_frequency(checked.train_items + checked.val_items)
    if tc.data.tag_frequency_file:
        atomic_write_text(run_dir / "tag_frequency.txt", format_tag_frequency(frequency, tc.data.tag_frequency_sort))
    if tc.legacy.save_json_folder:
        from lorasweep.legacy import write_lets_json

        write_lets_json(tc, Path(tc.legacy.save_json_folder).expanduser(), run_dir.name)
    all_tags = {"lorasweep.run_dir": str(run_dir.resolve()), **(tags or {})}
    reporter = None
    if tc.trial.active:
        from lorasweep.sweeping.trial import TrialReporter

        reporter = TrialReporter(tc.trial)
        all_tags.update({"optuna.study": str(tc.trial.study_name), "optuna.trial_number": str(tc.trial.number)})
    if tc.trial.num_threads:
        import torch

        torch.set_num_threads(tc.trial.num_threads)
    tracker = MlflowRun(tc.tracking, output_root, run_dir.name, all_tags) if tc.tracking.enabled else None
    folder.start_record(
        name=run_dir.name, train_dir=str(checked.train_dir), device=str(pick_device(tc.training.device)),
        n_train_images=len(checked.train_items), n_val_images=len(checked.val_items),
        n_reg_images=len(checked.reg_items), resumed_from=tc.resume.state_dir,
        resume_forced=list(checked.resume_forced) or None,
        missing_captions=checked.missing_captions, tags=all_tags,
        trial=None if not tc.trial.active else {"study": tc.trial.study_name, "number": tc.trial.number,
                                                "storage": tc.trial.storage},
        mlflow=None if tracker is None else {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
                                             "run_id": tracker.run_id})
    log.info("run %s: %d training and %d validation images from %s", run_dir.name, len(checked.train_items),
             len(checked.val_items), checked.train_dir)
    if reporter is not None:
        reporter.set_attrs(run_dir=str(run_dir.resolve()),
                           **({} if tracker is None else {"mlflow_run_id": tracker.run_id}))
    board = None
    if tc.tracking.tensorboard_dir:
        from lorasweep.tracking.tensorboard import TensorBoardLog

        board = TensorBoardLog(Path(tc.tracking.tensorboard_dir).expanduser(), run_dir.name)
    recorder = _Recorder(folder, tracker, reporter, board)
    status = "FAILED"
    base = None
    try:
        if tracker is not None:
            tracker.log_params(flatten(resolved))
            tracker.log_artifact(folder.config_path)
        loaded = acquire_model(tc.model)
        base = loaded.base
        folder.update_record(model_load={"cached": loaded.cached, "seconds": round(loaded.seconds, 3),
                                         "pid": os.getpid()})
        log.info("base model %s: %s in %.1f s", base.model_id, "reused from this process" if loaded.cached
                 else "loaded", loaded.seconds)
        base_hashes = _base_hashes(tc)
        saved_state = None
        if tc.resume.state_dir:
            saved_state = load_state(Path(tc.resume.state_dir).expanduser(), tc, checked.data_digest)
            if checked.resume_forced:
                log.warning("resuming with resume.force although %s changed: this run is not the continuation "
                            "of the saved one", ", ".join(checked.resume_forced))

        def facts(epoch: int, plan: Plan, steps: int | None = None) -> TrainingFacts:
            return TrainingFacts(steps=steps,
                model_id=base.model_id, num_train_images=sum(it.repeats for it in checked.train_items),
                num_batches_per_epoch=plan.batches_per_epoch, num_epochs=plan.epochs, epoch=epoch,
                max_train_steps=plan.total_steps, warmup_steps=plan.warmup_steps, started_at=started,
                tag_frequency=frequency, dataset_dirs=_dataset_dirs(checked.train_items),
                num_validation_images=len(checked.val_items), num_reg_images=plan.num_reg_images,
                reg_dataset_dirs=_dataset_dirs(list(checked.reg_items)), bucket_info=plan.bucket_info,
                **base_hashes)

        def save(name: str, tensors: dict[str, Any], meta_facts: TrainingFacts) -> Path:
            path = lora_file_path(run_dir, name, tc.output.format)
            save_lora(path, tensors, None if tc.output.no_metadata else kohya_metadata(tc, meta_facts),
                      tc.output.format)
            if tc.output.export_dir:
                export_lora(path, Path(tc.output.export_dir).expanduser(), run_dir.name)
            return path

        def snapshot(epoch: int, step: int, tensors: dict[str, Any], plan: Plan, *, by_step: bool = False) -> None:
            name = f"{tc.output.name}-step{step:08d}" if by_step else f"{tc.output.name}-{epoch:06d}"  # kohya's
            path = save(name, tensors, facts(epoch, plan, step))
            log.info("step %d (epoch %d): saved %s", step, epoch, path.name)

        recorder.snapshot_saver = snapshot
        with TrainProgress(console, run_dir.name, enabled=show_progress) as progress:
            recorder.progress_bar = progress
            train_start = time.perf_counter()
            result = train(tc, base, checked.train_items, checked.val_items, recorder,
                           reg_items=list(checked.reg_items), resume=saved_state, state_root=run_dir / "state")
            train_time = time.perf_counter() - train_start
        lora_path = save(tc.output.name, result.lora_tensors, facts(result.plan.epochs, result.plan))
        status = "FINISHED"
        job_result = JobResult(run_dir, result.val_loss_start, result.val_loss, lora_path,
                               None if tracker is None else tracker.run_id, None if tracker is None else tracker.uri,
                               train_time_s=train_time, steps=result.steps,
                               val_per_timestep=result.val_per_timestep)
        if result.feature_cache:
            log.info("feature cache: %s", ", ".join(f"{kind} {c['hits']} hits, {c['built']} built"
                                                   for kind, c in result.feature_cache.items()))
        folder.update_record(feature_cache=result.feature_cache, conv_kernels=result.conv_kernels,
                             peak_rss_mib=peak_rss_mib(),
                             time_to_first_step_s=None if result.first_step_at is None
                             else round(result.first_step_at - job_start, 3),
                             objective=result.val_loss, val_loss=result.val_loss,
                             val_loss_start=result.val_loss_start, steps=result.steps, train_time_s=train_time,
                             objectives=job_result.objectives, val_history=result.val_history,
                             lora=str(lora_path.relative_to(run_dir)))
        return job_result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except optuna.TrialPruned as exc:
        status = "PRUNED"
        folder.update_record(pruned=str(exc))
        raise
    except BaseException as exc:
        error = "".join(traceback.format_exception_only(exc)).strip()
        log.error("run failed: %s", error)
        folder.update_record(error=error)
        if tracker is not None:
            tracker.set_tags({"lorasweep.error": error[:5000]})
        raise
    finally:
        if base is not None:
            release_model(base)
        folder.update_record(status=status, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             duration_s=round(time.time() - started, 3))
        folder.close()
        if board is not None:
            board.close()
        try:
            if tracker is not None:
                if reporter is not None:
                    tracker.set_tags({"optuna.state": {"FINISHED": "COMPLETE", "PRUNED": "PRUNED"}.get(status,
                                                                                                    "FAIL")})
                _finish_tracking(tracker, folder, "KILLED" if status == "PRUNED" else status)
        finally:
            detach_log_handlers(handlers)  # after tracking: a gap in MLflow is reported on the console and in train.log


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (MiB); in a reused trial process, over all its trials."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def _finish_tracking(tracker: MlflowRun, folder: RunFolder, status: str) -> None:
    for name in ("train.log", "run.json", "metrics.jsonl", "tag_frequency.txt"):
        if (folder.path / name).exists():
            tracker.log_artifact(folder.path / name)
    for lora in sorted(p for p in (folder.path / "lora").iterdir() if not p.name.startswith(".")):
        tracker.log_artifact(lora, "lora")
    tracker.end(status)
    report = tracker.report()
    if report["outages"]:
        folder.update_record(tracking=report)
    if not report["complete"]:
        missing = ", ".join(f"{n} {kind}" for kind, n in report["unsent"].items() if n)
        log.warning("MLflow at %s did not get everything of this run (%s%s; last error: %s). The run folder %s "
                    "is complete: metrics.jsonl, samples/ and lora/ hold it all; run.json 'tracking' lists the gap.",
                    report["uri"], missing or "nothing queued",
                    "" if report["status_set"] else f", and its status is not {status} there",
                    report["last_error"], folder.path)


def export_lora(path: Path, export_dir: Path, run_name: str) -> Path:
    """Copy a saved LoRA into ``output.export_dir`` under its own name, or — when that name is taken, e.g. by
    another trial of a sweep — under ``<name>_<run folder>``; an existing file is never replaced."""
    from lorasweep.network.kohya import export_copy

    export_dir.mkdir(parents=True, exist_ok=True)
    target = export_dir / path.name
    if target.exists():
        target = export_dir / f"{path.stem}_{run_name}{path.suffix}"
    return export_copy(path, target)


def _base_hashes(cfg: TrainConfig) -> dict[str, str | None]:
    """kohya's hashes of single-file base and VAE checkpoints (``ss_sd_model_hash`` ...); a folder has none."""
    from lorasweep.network.metadata import legacy_model_hash, sha256_file

    out: dict[str, str | None] = {}
    for prefix, value in (("model", cfg.model.base), ("vae", cfg.model.vae)):
        path = Path(value).expanduser() if value else None
        if path is not None and path.is_file():
            out[f"{prefix}_hash"] = legacy_model_hash(path)
            out[f"new_{prefix}_hash"] = sha256_file(path)
    return out


def _dataset_dirs(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    dirs: dict[str, dict[str, int]] = {}
    for item in items:
        entry = dirs.setdefault(item.path.parent.name, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs


class _Recorder:
    """Fans the loop's results out to the run folder, MLflow and the progress bar."""

    def __init__(self, folder: RunFolder, tracker: MlflowRun | None, reporter: TrialReporter | None = None,
                 board: TensorBoardLog | None = None) -> None:
        self.folder = folder
        self.tracker = tracker
        self.reporter = reporter
        self.board = board
        self.progress_bar: TrainProgress | None = None
        self.snapshot_saver: Callable[..., None] | None = None

    def snapshot(self, epoch: int, step: int, tensors: dict[str, Any], plan: Plan, *, by_step: bool = False) -> None:
        if self.snapshot_saver is not None:
            self.snapshot_saver(epoch, step, tensors, plan, by_step=by_step)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.folder.log_metrics(step, values)
        if self.tracker is not None:
            self.tracker.log_metrics(step, values)
            self.tracker.flush()
        if self.board is not None:
            self.board.log_metrics(step, values)
        if "val_loss" in values:
            log.info("step %d: val_loss %.6f", step, values["val_loss"])
        if self.reporter is not None:
            self.reporter.report(step, values)
        _faults.inject(step, None if self.reporter is None else self.reporter.number)

    def samples(self, step: int, samples: list[Sample]) -> None:
        out = self.folder.path / "samples" / f"{step:06d}"
        out.mkdir(parents=True, exist_ok=True)
        for sample in samples:
            tmp = out / f".{sample.file_name}.tmp.png"
            sample.image.save(tmp)
            tmp.replace(out / sample.file_name)
            if self.tracker is not None:
                self.tracker.log_image(sample.image, key=sample.key, step=step)

    def progress(self, step: int, total: int, loss: float | None) -> None:
        if self.progress_bar is not None:
            self.progress_bar.update(step, total, loss)
