"""Keys of ``hydra/sweeper=lorasweep_optuna``: types, defaults and what each means.

No ``from __future__ import annotations`` here: Hydra's plugin scan executes this module outside
``sys.modules``, where dataclasses cannot resolve string annotations.
"""


from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class LorasweepOptunaConf:
    """An Optuna study driven by Hydra: every trial is one ``lorasweep train`` job launched by Hydra's
    launcher, in asynchronous slots (a finished trial frees its slot at once)."""

    _target_: str = "hydra_plugins.lorasweep_optuna.sweeper.LorasweepOptunaSweeper"

    sampler: str = "tpe"
    """tpe, random, grid, cmaes, qmc or gp."""

    sampler_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the Optuna sampler (e.g. ``{n_startup_trials: 5}`` for tpe)."""

    seed: int | None = None
    """Sampler seed: the same seed proposes the same parameters."""

    pruner: str = "none"
    """none, median, percentile, successive_halving or hyperband; trials report ``val_loss`` at each
    validation (``validation.every_n_steps``) and stop early when pruned."""

    pruner_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the Optuna pruner (e.g. ``{n_startup_trials: 4, n_warmup_steps: 40}``)."""

    objective: Any = "val_loss"
    """The metric to optimise, or a list of metrics for a multi-objective study: val_loss, val_loss_drop,
    steps_per_s, train_time_s."""

    direction: Any = "minimize"
    """minimize or maximize, or a list matching ``objective``."""

    storage: str | None = None
    """Optuna storage: null = a journal file ``optuna.journal`` in the sweep folder; or
    ``journal:///abs/path`` or any RDB URL (``sqlite:////abs/optuna.db``, ``postgresql://...``) to share a
    study between controllers or machines."""

    study_name: str = "sweep"
    """The study's name in the storage. Running the same sweep again continues this study."""

    n_trials: int = 20
    """Finished trials (COMPLETE or PRUNED) the *study* should have in the end: a resumed sweep only runs
    what is missing. Failed trials do not count (see ``max_failures``)."""

    max_parallel: int = 1
    """Trials running at once (slots). >1 needs a launcher that runs jobs in processes (joblib)."""

    max_failures: int = 3
    """Stop launching once more trials than this have failed over the whole study."""

    timeout: float | None = None
    """Seconds after which no new trial is started (running ones finish)."""

    retry_interrupted: bool = False
    """On resume, re-enqueue the trials a killed controller left RUNNING, with the same parameters."""

    params: dict[str, str] = field(default_factory=dict)
    """The search space: config key → Hydra sweep grammar, e.g. ``optimizer.lr: tag(log, interval(1e-5,
    1e-2))``, ``network.dim: choice(4, 8, 16)``, ``scheduler: choice(constant, cosine)``. Sweep overrides
    on the command line are added to it."""

    custom_search_space: str | None = None
    """Dotted path of a function ``(cfg, trial) -> dict[str, Any]`` that suggests further (conditional)
    parameters; its result is applied as overrides."""


ConfigStore.instance().store(group="hydra/sweeper", name="lorasweep_optuna", node=LorasweepOptunaConf,
                             provider="lorasweep")
