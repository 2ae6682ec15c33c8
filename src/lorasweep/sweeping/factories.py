"""Optuna samplers, pruners and study directions from the names and keyword args in ``hydra.sweeper``.

Every name and keyword is checked here, before a study exists, so that a typo in the sweeper config is one
:class:`UserError` naming the key at fault (``hydra.sweeper.sampler``, ``hydra.sweeper.pruner_args``, ...) and
listing what is accepted, instead of an Optuna ``TypeError`` from deep inside a trial slot.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from omegaconf import Container, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from lorasweep.errors import UserError
from lorasweep.sweeping.space import SearchSpace

SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc", "gp")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")
DIRECTIONS = {"minimize": "minimize", "min": "minimize", "maximize": "maximize", "max": "maximize"}

SAMPLER_KEY = "hydra.sweeper.sampler"
SAMPLER_ARGS_KEY = "hydra.sweeper.sampler_args"
PRUNER_KEY = "hydra.sweeper.pruner"
PRUNER_ARGS_KEY = "hydra.sweeper.pruner_args"
DIRECTION_KEY = "hydra.sweeper.direction"
SEED_KEY = "hydra.sweeper.seed"


def make_sampler(name: str, *, seed: int | None, space: SearchSpace, n_objectives: int,
                 args: Mapping[str, Any] | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler called ``name`` (one of :data:`SAMPLERS`), seeded with ``seed``.

    * ``tpe``: ``TPESampler(multivariate=True, constant_liar=True)``. The sweep runs several trials at once in
      parallel slots; without the constant liar every slot would be sampled from the same finished trials and
      propose nearly the same point. Multivariate TPE models the params jointly (they interact: lr and rank);
      like Optuna 5's own default, it is used for a single objective only, independent TPE for several.
    * ``random``, ``qmc`` (Sobol), ``gp`` (Gaussian process; Optuna 5 handles categorical params and several
      objectives), ``grid`` (every combination of :meth:`SearchSpace.grid`, in random order).
    * ``cmaes``: float and int params only, and a single objective; both are refused here with a hint to use
      tpe, rather than letting CMA-ES fall back to random sampling or fail in the first trial.

    ``args`` are keyword args of the Optuna class, checked against its signature; the seed comes from
    ``hydra.sweeper.seed`` only, so that one key seeds every sampler.
    """
    key = _pick(name, SAMPLERS, SAMPLER_KEY, "sampler")
    kwargs = _plain(args, SAMPLER_ARGS_KEY)
    if "seed" in kwargs:
        raise UserError(SAMPLER_ARGS_KEY, "sets `seed`, which belongs to the sweeper itself.",
                        f"Set `{SEED_KEY}` instead.")
    multi = n_objectives > 1
    defaults: dict[str, Any] = {"seed": seed}
    cls: Callable[..., optuna.samplers.BaseSampler]
    if key == "tpe":
        cls = optuna.samplers.TPESampler
        defaults.update(multivariate=not multi, constant_liar=True)
    elif key == "random":
        cls = optuna.samplers.RandomSampler
    elif key == "grid":
        cls = _AskTellGridSampler
        if "search_space" in kwargs:
            raise UserError(SAMPLER_ARGS_KEY, "sets `search_space`; the grid comes from `hydra.sweeper.params`.",
                            "Remove `search_space` and list the values with `choice(...)` or `range(...)`.")
        defaults["search_space"] = space.grid()
    elif key == "cmaes":
        cls = optuna.samplers.CmaEsSampler
        if multi:
            raise UserError(SAMPLER_KEY, f"cmaes optimizes a single objective; this sweep has {n_objectives}.",
                            "Use `hydra.sweeper.sampler=tpe` (or gp) for several objectives.")
        categorical = [space.override_keys.get(param, param) for param, dist in space.distributions.items()
                       if isinstance(dist, optuna.distributions.CategoricalDistribution)]
        if categorical:
            raise UserError(SAMPLER_KEY, "cmaes samples float and int params only, but "
                            f"{', '.join(f'`{param}`' for param in categorical)} "
                            f"{'is a choice' if len(categorical) == 1 else 'are choices'}.",
                            "Use `hydra.sweeper.sampler=tpe`, or make those params fixed values or intervals.")
    elif key == "qmc":
        cls = optuna.samplers.QMCSampler
    else:
        cls = optuna.samplers.GPSampler
    _check_keywords(cls, kwargs, set(defaults) - {"multivariate", "constant_liar"}, SAMPLER_ARGS_KEY, key)
    return _build(cls, {**defaults, **kwargs}, SAMPLER_ARGS_KEY, key)


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its ``study.stop()`` once the grid is exhausted: that call is only legal inside
    ``study.optimize``, and the sweep controller (ask/tell) stops by counting trials itself."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        return None


def grid_size(space: SearchSpace) -> int:
    """Number of points of the grid sampler's grid."""
    return math.prod(len(values) for values in space.grid().values())


def make_pruner(name: str, args: Mapping[str, Any] | None = None, *,
                n_objectives: int = 1) -> optuna.pruners.BasePruner:
    """The Optuna pruner called ``name`` (one of :data:`PRUNERS`), with Optuna's defaults unless ``args`` says
    otherwise (``percentile`` defaults to 25.0, since Optuna has no default for it).

    A study with several objectives cannot prune (Optuna refuses ``trial.should_prune`` there), so any pruner
    but ``none`` is refused up front rather than failing in every trial.
    """
    key = _pick(name, PRUNERS, PRUNER_KEY, "pruner")
    kwargs = _plain(args, PRUNER_ARGS_KEY)
    if key != "none" and n_objectives > 1:
        raise UserError(PRUNER_KEY, f"is {key}, but Optuna cannot prune a study with {n_objectives} objectives.",
                        "Set `hydra.sweeper.pruner=none`, or optimize a single objective.")
    defaults: dict[str, Any] = {}
    cls: Callable[..., optuna.pruners.BasePruner]
    if key == "none":
        cls = optuna.pruners.NopPruner
    elif key == "median":
        cls = optuna.pruners.MedianPruner
    elif key == "percentile":
        cls = optuna.pruners.PercentilePruner
        defaults["percentile"] = 25.0
    elif key == "successive_halving":
        cls = optuna.pruners.SuccessiveHalvingPruner
    else:
        cls = optuna.pruners.HyperbandPruner
    _check_keywords(cls, kwargs, set(), PRUNER_ARGS_KEY, key)
    return _build(cls, {**defaults, **kwargs}, PRUNER_ARGS_KEY, key)


def parse_directions(direction: str | Sequence[str]) -> list[str]:
    """Optuna's directions from ``hydra.sweeper.direction``: one of minimize/maximize (or min/max, any case),
    or a list of them, one per objective, for a multi-objective sweep."""
    items = [direction] if isinstance(direction, str) else list(direction)
    if not items:
        raise UserError(DIRECTION_KEY, "is an empty list.", "Give `minimize` or `maximize`, or one per objective.")
    result = []
    for item in items:
        word = str(item).strip().lower()
        if word not in DIRECTIONS:
            raise UserError(DIRECTION_KEY, f"has the unknown direction {item!r}.",
                            "Use `minimize` or `maximize` (or `min`/`max`); a list gives one per objective.")
        result.append(DIRECTIONS[word])
    return result


def _pick(name: str, valid: Sequence[str], where: str, what: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key in valid:
        return key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"Did you mean `{close[0]}`? " if close else ""
    raise UserError(where, f"{name!r} is not a known {what}.", f"{hint}Valid {what}s: {', '.join(valid)}.")


def _plain(args: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """``args`` as a plain dict (OmegaConf nodes turned into Python containers, as Optuna expects)."""
    if args is None:
        return {}
    if isinstance(args, Container):
        args = OmegaConf.to_container(args, resolve=True)  # type: ignore[assignment]
    if not isinstance(args, Mapping):
        raise UserError(where, f"is a {type(args).__name__}, not a mapping of keyword args.",
                        "Write it as a mapping, e.g. `{n_startup_trials: 5}`.")
    return {str(key): value for key, value in args.items()}


def _check_keywords(cls: Callable[..., Any], kwargs: Mapping[str, Any], reserved: set[str], where: str,
                    name: str) -> None:
    accepted = [param.name for param in inspect.signature(cls).parameters.values()
                if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and param.name not in reserved]
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f"Did you mean `{close[0]}`? " if close else ""
        listing = ", ".join(accepted) if accepted else "none"
        raise UserError(where, f"has the unknown keyword(s) {', '.join(unknown)} for the {name} "
                        f"{'pruner' if where == PRUNER_ARGS_KEY else 'sampler'}.",
                        f"{hint}Accepted: {listing}.")


def _build(cls: Callable[..., Any], kwargs: dict[str, Any], where: str, name: str) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise UserError(where, f"is not accepted by the {name} {cls.__name__}: {str(error).rstrip('.')}.",
                        "Fix the value; see Optuna's documentation of the class for the accepted values.") from None
