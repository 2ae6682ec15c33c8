"""The sweep controller behind ``hydra/sweeper=lorasweep_optuna``.

Why not Hydra's batch model: a sweep over learning rates and ranks has trials of very different lengths
(pruned ones stop early), so each parallel *slot* asks Optuna for the next trial as soon as its own trial
ends; nothing waits for a batch. Each slot is a thread that calls ``launcher.launch([overrides])`` for one
trial; the launcher decides where the job runs (in this process for the basic launcher, a worker process for
joblib). The study lives in a storage shared with the jobs (which report validation losses for pruning) and
with other controllers (which split the study's trials between them).

Everything the user wrote is checked before the first trial starts; a mistake is one ``UserError``.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from lorasweep.errors import UserError
from lorasweep.liveness import is_alive, process_identity
from lorasweep.sweeping._process import TrialProcessError
from lorasweep.sweeping.factories import grid_size, make_pruner, make_sampler, parse_directions
from lorasweep.sweeping.space import SearchSpace, check_keys, format_value, parse_search_space
from lorasweep.sweeping.storage import JOURNAL_FILE, SweepRecord, journal_url, open_storage
from lorasweep.tracking.run_folder import close_interrupted_run

log = logging.getLogger("lorasweep.sweep")

_KEY = "hydra.sweeper"
_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
_IN_PROCESS_NOTE = ("runs jobs in this process, one at a time (and parallel slots would clobber Hydra's global "
                    "state)")


@dataclass
class Counts:
    """Trials of the whole study (all controllers) by state."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


def hydra_literal(value: Any) -> str:
    """A value (also lists and dicts) in Hydra's override grammar."""
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_literal(v) for v in value) + "]"
    return format_value(value)


class SweepController:
    """Checks the sweep, opens the study, runs trials in async slots, reports."""

    def __init__(self, conf: Mapping[str, Any], *, hydra_context: HydraContext, task_function: TaskFunction,
                 config: DictConfig) -> None:
        self.conf = OmegaConf.create({k: v for k, v in conf.items() if k != "_target_"})
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.owner = process_identity()  # lets a resumed sweep tell a dead controller's trials from live ones
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from SweepProgress

    # ---------------------------------------------------------------------------------------------- checks

    def _objectives(self) -> tuple[list[str], list[str]]:
        from lorasweep.job import objective_names

        raw = self.conf.objective
        objectives = [raw] if isinstance(raw, str) else [str(o) for o in raw]
        names = objective_names(int(t) for t in self.config.validation.timesteps)
        for name in objectives:
            if name not in names:
                raise UserError(f"{_KEY}.objective", f"{name!r} is not a metric a run returns.",
                                "Choose from: " + ", ".join(f"{k} ({v})" for k, v in names.items()) + ".")
        directions = parse_directions(self.conf.direction)
        if len(directions) == 1 and len(objectives) > 1:
            directions = directions * len(objectives)
        if len(directions) != len(objectives):
            raise UserError(f"{_KEY}.direction", f"has {len(directions)} entries for {len(objectives)} objectives "
                            f"({', '.join(objectives)}).", "Give one direction per objective.")
        return objectives, directions

    def _space(self, arguments: list[str]) -> SearchSpace:
        params = {str(k): v for k, v in (self.conf.params or {}).items()}
        for argument in arguments:
            key, sep, value = argument.partition("=")
            if not sep:
                raise UserError("command line", f"{argument!r} is not an override of the form key=value.",
                                "Write e.g. `optimizer.lr=1e-4,3e-4` or `network.dim=choice(4,8)`.")
            params[key] = value
        space = parse_search_space(params)
        self.param_text = {key: str(value) for key, value in params.items()}
        from lorasweep.config.train import GROUPS

        plain = OmegaConf.create({k: v for k, v in self.config.items() if k != "hydra"})
        check_keys(space, plain, set(GROUPS))
        if not space.distributions:
            raise UserError(f"{_KEY}.params", "is empty: there is nothing to search.",
                            "Give the search space in the preset or on the command line, e.g. "
                            "`optimizer.lr='tag(log, interval(1e-5, 1e-2))'`.")
        return space

    def _check_counts(self) -> None:
        c = self.conf
        for key, value, low in (("n_trials", c.n_trials, 1), ("max_parallel", c.max_parallel, 1),
                                ("max_failures", c.max_failures, 0)):
            if value < low:
                raise UserError(f"{_KEY}.{key}", f"is {value}; it must be at least {low}.")
        if c.timeout is not None and c.timeout <= 0:
            raise UserError(f"{_KEY}.timeout", f"is {c.timeout}; give seconds > 0 or null.")
        target = str(self.config.hydra.launcher.get("_target_", ""))
        if c.max_parallel > 1:
            if target == _BASIC_LAUNCHER:
                raise UserError(f"{_KEY}.max_parallel", f"is {c.max_parallel}, but the basic launcher "
                                f"{_IN_PROCESS_NOTE}.", "Add `hydra/launcher=joblib` (one worker process per "
                                "slot), or set `hydra.sweeper.max_parallel=1`.")
            n_jobs = self.config.hydra.launcher.get("n_jobs")
            if "joblib" in target and n_jobs is not None and 0 < n_jobs < c.max_parallel:
                raise UserError("hydra.launcher.n_jobs", f"is {n_jobs}, fewer than hydra.sweeper.max_parallel="
                                f"{c.max_parallel}: slots would queue behind each other (and n_jobs=1 "
                                f"{_IN_PROCESS_NOTE}).", f"Set `hydra.launcher.n_jobs={c.max_parallel}`.")

    def _custom_space(self) -> Callable[[DictConfig, optuna.Trial], dict[str, Any]] | None:
        path = self.conf.custom_search_space
        if not path:
            return None
        module, _, name = str(path).rpartition(".")
        try:
            function = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as error:
            raise UserError(f"{_KEY}.custom_search_space", f"cannot import {path!r}: {error}.",
                            "Give the dotted path of a function `(cfg, trial) -> dict` on the Python path.") \
                from None
        if not callable(function):
            raise UserError(f"{_KEY}.custom_search_space", f"{path!r} is not a function.")
        return function  # type: ignore[no-any-return]

    def _study(self, storage_url: str, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
               directions: list[str]) -> optuna.Study:
        storage = open_storage(storage_url)
        name = str(self.conf.study_name)
        try:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                       directions=directions)
        existing = [d.name.lower() for d in study.directions]
        if existing != directions:
            raise UserError(f"{_KEY}.direction", f"is {directions}, but the study {name!r} in {storage_url} was "
                            f"created with {existing}.", "Use the study's direction, or another "
                            "`hydra.sweeper.study_name` for a new study.")
        return study

    # ---------------------------------------------------------------------------------------------- resume

    def _recover(self, study: optuna.Study) -> int:
        """Mark trials left RUNNING by a dead controller FAIL (re-enqueued when ``retry_interrupted``)."""
        recovered = 0
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = str(trial.user_attrs.get("controller", ""))
            if owner and is_alive(owner):
                continue
            study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted: its sweep controller "
                                               "stopped while it ran")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            _close_interrupted(trial.user_attrs)
            recovered += 1
            log.warning("trial %d was left RUNNING by a stopped controller: marked FAIL", trial.number)
            if self.conf.retry_interrupted:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
                log.info("trial %d re-enqueued with the same parameters", trial.number)
        return recovered

    @staticmethod
    def counts(study: optuna.Study) -> Counts:
        c = Counts()
        for trial in study.get_trials(deepcopy=False):
            if trial.state == TrialState.COMPLETE:
                c.complete += 1
            elif trial.state == TrialState.PRUNED:
                c.pruned += 1
            elif trial.state == TrialState.FAIL:
                c.failed += 1
            elif trial.state == TrialState.RUNNING:
                c.running += 1
            else:
                c.waiting += 1
        return c

    # ---------------------------------------------------------------------------------------------- sweep

    def sweep(self, arguments: list[str]) -> optuna.Study:
        from lorasweep.config.train import to_train_config
        from lorasweep.job import reported_while_running
        from lorasweep.sweeping.parent import close_parent, open_parent

        space = self._space(arguments)
        objectives, directions = self._objectives()
        self._check_counts()
        custom = self._custom_space()
        pruner = make_pruner(self.conf.pruner, self.conf.pruner_args, n_objectives=len(objectives))
        if self.conf.pruner != "none" and not (len(objectives) == 1 and reported_while_running(objectives[0])):
            raise UserError(f"{_KEY}.pruner", f"is {self.conf.pruner}, but trials report only the validation "
                            f"losses while they run and the objective is {objectives}.",
                            "Set `hydra.sweeper.pruner=none`, or one objective: `hydra.sweeper.objective=val_loss` "
                            "(or val_loss/t<timestep>).")
        sampler = make_sampler(self.conf.sampler, seed=self.conf.seed, space=space, n_objectives=len(objectives),
                               args=self.conf.sampler_args)
        train_cfg = to_train_config({k: v for k, v in self.config.items() if k != "hydra"})
        from lorasweep.job import preflight

        preflight(train_cfg)  # data and model paths: a missing folder stops the sweep before any trial
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        if not self.conf.storage:
            sweep_dir.mkdir(parents=True, exist_ok=True)  # the default journal lives in it
        storage_url = self.conf.storage or journal_url(sweep_dir / JOURNAL_FILE)
        study = self._study(storage_url, sampler, pruner, directions)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(sweep_dir / ".controller.lock"))  # controllers sharing the folder take turns
        with lock:
            self._recover(study)
            existing = len(study.get_trials(deepcopy=False))
        if existing and self.conf.seed is not None:
            # A resumed sampler with the first run's seed would replay the first run's proposals.
            study.sampler = make_sampler(self.conf.sampler, seed=int(self.conf.seed) + existing, space=space,
                                         n_objectives=len(objectives), args=self.conf.sampler_args)
            log.info("continuing study %r: %d trials so far (%d finished)", study.study_name, existing,
                     self.counts(study).finished)
        _save_multirun_yaml(self.config, sweep_dir)
        record = SweepRecord(study_name=study.study_name, storage=storage_url, objectives=objectives,
                             directions=directions, params=list(space.distributions))
        params = {"sweep.sampler": str(self.conf.sampler), "sweep.pruner": str(self.conf.pruner),
                  "sweep.n_trials": str(self.conf.n_trials), "sweep.max_parallel": str(self.conf.max_parallel),
                  "sweep.objective": ",".join(objectives), "sweep.direction": ",".join(directions),
                  **{f"space.{k.lstrip('+')}": v for k, v in self.param_text.items()
                     if k.lstrip("+") in space.distributions}}
        with lock:
            record = open_parent(sweep_dir, train_cfg, record, params=params,
                                 tags={"optuna.study": study.study_name, "lorasweep.sweeper": "lorasweep_optuna"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(objectives)
        from lorasweep.models.loading import prepare_base

        prepare_base(train_cfg.model)
        status = "FAILED"
        try:
            stopped = self._run_slots(study, space, custom, objectives, storage_url, train_cfg, lock)
            status = "FINISHED" if stopped is None else "FAILED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            close_workers = getattr(self.launcher, "close", None)  # lorasweep_process keeps idle trial processes
            if callable(close_workers):
                close_workers()
            try:
                from lorasweep.sweeping.report import build_report

                build_report(sweep_dir)
            finally:
                close_parent(record, status)
        if stopped is not None:
            raise SweepStopped(stopped)
        return study

    def _trial_overrides(self, trial: optuna.Trial, storage_url: str, objectives: list[str], threads: int | None,
                         ) -> list[str]:
        node = {"study_name": self.conf.study_name, "storage": storage_url, "number": trial.number,
                "pruner": self.conf.pruner, "objectives": objectives, "num_threads": threads}
        overrides = [f"trial.{k}={hydra_literal(v)}" for k, v in node.items()]
        # `++`: a plain override cannot put new keys into the schema's empty dict
        overrides.append(f"++trial.pruner_args={hydra_literal(dict(self.conf.pruner_args or {}))}")
        return overrides

    def _run_slots(self, study: optuna.Study, space: SearchSpace,
                   custom: Callable[[DictConfig, optuna.Trial], dict[str, Any]] | None, objectives: list[str],
                   storage_url: str, train_cfg: Any, lock: FileLock) -> str | None:
        """Keep ``max_parallel`` trials running until the study has ``n_trials`` finished ones; returns why it
        stopped early (failure budget), else None."""
        c = self.conf
        n_trials = int(c.n_trials)
        if str(c.sampler).lower() == "grid" and grid_size(space) < n_trials:
            log.info("the grid has %d points: the sweep stops there (hydra.sweeper.n_trials=%d)", grid_size(space),
                     n_trials)
            n_trials = grid_size(space)
        threads = train_cfg.trial.num_threads  # the user's, e.g. when several controllers share the machine
        if threads is None and train_cfg.training.device != "cuda":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            threads = max(1, cores // c.max_parallel)
        deadline = None if c.timeout is None else time.monotonic() + float(c.timeout)
        running: dict[Future[JobReturn], optuna.Trial] = {}
        stopped: str | None = None
        progress = SweepProgress(study, n_trials)
        with ThreadPoolExecutor(max_workers=int(c.max_parallel), thread_name_prefix="lorasweep-slot") as pool:
            while True:
                while len(running) < c.max_parallel and stopped is None:
                    if deadline is not None and time.monotonic() > deadline:
                        log.warning("hydra.sweeper.timeout reached: no new trials")
                        break
                    with lock:  # count and ask atomically, or two controllers overshoot n_trials
                        counts = self.counts(study)
                        if counts.failed > c.max_failures:
                            stopped = (f"{counts.failed} trials failed, more than hydra.sweeper.max_failures="
                                       f"{c.max_failures}")
                            log.error("stopping the sweep: %s", stopped)
                            break
                        if counts.finished + counts.running >= n_trials:
                            break
                        trial = study.ask()
                        trial.set_user_attr("controller", self.owner)
                    values = space.suggest(trial)
                    overrides = space.overrides(values)
                    if custom is not None:
                        extra = custom(self.config, trial)
                        overrides += [f"{k}={hydra_literal(v)}" for k, v in extra.items()]
                    overrides += self._trial_overrides(trial, storage_url, objectives, threads)
                    log.info("trial %d starts: %s", trial.number, " ".join(space.overrides(values)))
                    running[pool.submit(self._launch, overrides, trial.number)] = trial
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    trial = running.pop(future)
                    self._tell(study, trial, future, objectives)
                    progress.update()
        return stopped

    def _launch(self, overrides: list[str], number: int) -> JobReturn:
        (ret,) = self.launcher.launch([overrides], initial_job_idx=number)
        return ret

    def _tell(self, study: optuna.Study, trial: optuna.Trial, future: Future[JobReturn],
              objectives: list[str]) -> None:
        """Turn the job's return into the trial's final state: values, PRUNED or FAIL (with the error)."""
        values: list[float] | None = None
        error: Any = None
        try:
            ret = future.result()
            if ret.status == JobStatus.COMPLETED:
                result = ret.return_value
                values = [float(result[name]) for name in objectives]
                bad = [f"{n}={v}" for n, v in zip(objectives, values, strict=True) if not math.isfinite(v)]
                if bad:
                    values, error = None, ValueError(f"the objective is not finite: {', '.join(bad)}")
            else:
                error = ret._return_value
        except Exception as exc:  # the launcher itself failed (e.g. a worker process died)
            error = exc
        try:
            if values is not None:
                study.tell(trial, values if len(values) > 1 else values[0])
            elif isinstance(error, optuna.TrialPruned):
                study.tell(trial, state=TrialState.PRUNED)
            else:
                text = ("".join(traceback.format_exception_only(error)).strip()
                        if isinstance(error, BaseException) else str(error))
                log.error("trial %d failed: %s", trial.number, text)
                trial.set_user_attr("error", text[:4000])
                if isinstance(error, TrialProcessError):  # it died (SIGKILL, OOM killer) before closing its run
                    # The job process set the attrs: read them from the storage, not this trial's cached copy.
                    stored = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
                    close_interrupted_run(_attr_path(stored.user_attrs.get("run_dir")), f"interrupted: {error}",
                                          tags={"optuna.state": "FAIL"})
                study.tell(trial, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another controller resuming the study judged this trial interrupted and closed it.
            log.warning("trial %d was already finished by another controller; its result is dropped", trial.number)


class SweepStopped(RuntimeError):
    """The sweep ended early (failure budget); the report was still written."""


class SweepProgress:
    """One status line per finished trial: done/running/pruned/failed and the best so far."""

    def __init__(self, study: optuna.Study, n_trials: int) -> None:
        self.study = study
        self.n_trials = n_trials

    def update(self) -> None:
        counts = SweepController.counts(self.study)
        best = ""
        if len(self.study.directions) == 1 and counts.complete:
            trial = self.study.best_trial
            best = f", best {trial.value:.6g} (trial {trial.number})"
        log.info("sweep: %d/%d done, %d running, %d pruned, %d failed%s", counts.finished, self.n_trials,
                 counts.running, counts.pruned, counts.failed, best)


def _attr_path(value: Any) -> Path | None:
    return Path(str(value)) if value else None


def _close_interrupted(attrs: Mapping[str, Any]) -> None:
    """Give an interrupted trial's run folder and MLflow run a final state (its job died with the controller)."""
    close_interrupted_run(_attr_path(attrs.get("run_dir")), "interrupted: its sweep controller stopped "
                          "while it ran", mlflow_run_id=attrs.get("mlflow_run_id"), tags={"optuna.state": "FAIL"})


def _save_multirun_yaml(config: DictConfig, sweep_dir: Path) -> None:
    """Hydra's basic sweeper writes ``multirun.yaml``; ours must too (a resumed sweep keeps the first)."""
    from lorasweep.tracking.files import atomic_write_text

    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        atomic_write_text(path, OmegaConf.to_yaml(config))
