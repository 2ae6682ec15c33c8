"""The search space of a sweep: ``hydra.sweeper.params`` (Hydra's override sweep grammar) turned into Optuna
distributions, and trial values turned back into Hydra overrides.

The grammar is parsed by Hydra's own override parser, so a sweep accepts exactly what ``lorasweep train`` would
accept on its command line, and the overrides a trial gets are parsed by the same parser again. The mapping:

* ``choice(a, b)`` or a plain comma list ``a,b`` -> ``CategoricalDistribution`` (values keep their parsed
  types: int, float, str, bool, None).
* ``range(start, stop, step)`` of ints -> ``IntDistribution(low, high=last value produced, step)``; with floats
  -> ``CategoricalDistribution`` of the values Hydra would produce (Hydra's range excludes ``stop``).
* ``interval(a, b)`` -> ``FloatDistribution(a, b)``. Hydra's ``interval`` always casts its bounds to float, so
  an integer interval is written ``int(interval(a, b))`` -> ``IntDistribution``. ``tag(log, ...)`` -> ``log=True``.
* Anything else (``seed: 3``) is a fixed value: not searched, passed to every trial as an override.
"""

from __future__ import annotations

import difflib
import functools
import math
import numbers
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from lorasweep.errors import UserError

if TYPE_CHECKING:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Override

KEY_PREFIX = "hydra.sweeper.params"
TAGS = frozenset({"log"})
"""The only sweep tag with a meaning for Optuna; any other tag is refused rather than silently ignored."""
MAX_FLOAT_RANGE_VALUES = 10_000
"""A float ``range()`` is enumerated into a categorical; more values than this is surely a mistake."""

_BARE_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_NOT_FOUND = object()
_NAN = object()


@dataclass(frozen=True)
class SearchSpace:
    """What a sweep searches (``distributions``) and what it holds fixed (``fixed``), keyed by the param name.

    The param name is the config key without Hydra's ``+``/``++`` prefix (so it reads well in Optuna and the
    leaderboard); ``override_keys`` keeps each key as written, prefix included, in the order of ``params``, so
    that :meth:`overrides` reproduces what the user asked for.
    """

    distributions: dict[str, optuna.distributions.BaseDistribution]
    fixed: dict[str, str]
    """param name -> the override value text, passed as-is (Hydra parses it in the trial)."""
    override_keys: dict[str, str] = field(default_factory=dict)
    """param name -> the key as written in ``params`` (``+foo``, ``db@backup``); missing names map to themselves."""

    def names(self) -> list[str]:
        """All param names, searched and fixed, in the order the user wrote them."""
        ordered = [name for name in self.override_keys if name in self.distributions or name in self.fixed]
        seen = set(ordered)
        ordered += [name for name in (*self.distributions, *self.fixed) if name not in seen]
        return ordered

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Ask ``trial`` for one value per searched param, in order, through the public ``suggest_*`` API (so any
        sampler, ``FixedTrial`` and enqueued trials work)."""
        values: dict[str, Any] = {}
        for name, dist in self.distributions.items():
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                values[name] = trial.suggest_categorical(name, dist.choices)  # type: ignore[arg-type]
            elif isinstance(dist, optuna.distributions.IntDistribution):
                values[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
            elif isinstance(dist, optuna.distributions.FloatDistribution):
                values[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
            else:  # pragma: no cover - parse_search_space makes only the three kinds above
                raise TypeError(f"unsupported distribution for {name!r}: {dist!r}")
        return values

    def overrides(self, values: Mapping[str, Any]) -> list[str]:
        """``["key=value", ...]`` for one trial: every searched param from ``values`` plus the fixed ones, in the
        order of ``params``, each value written so that Hydra parses it back to the same value and type."""
        missing = [name for name in self.distributions if name not in values]
        unknown = [name for name in values if name not in self.distributions]
        if missing or unknown:
            raise ValueError(f"values do not match the search space: missing {missing}, unknown {unknown}")
        result = []
        for name in self.names():
            key = self.override_keys.get(name, name)
            text = self.fixed[name] if name in self.fixed else format_value(values[name])
            result.append(f"{key}={text}")
        return result

    def grid(self) -> dict[str, list[Any]]:
        """The search space for Optuna's ``GridSampler``: the choices of each categorical, every value of an
        int range. A continuous interval has no grid, which is the user's to fix."""
        grid: dict[str, list[Any]] = {}
        for name, dist in self.distributions.items():
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                grid[name] = list(dist.choices)
            elif isinstance(dist, optuna.distributions.IntDistribution) and not dist.log:
                grid[name] = list(range(dist.low, dist.high + 1, dist.step))
            elif isinstance(dist, optuna.distributions.IntDistribution):
                raise UserError(f"{KEY_PREFIX}.{self.override_keys.get(name, name)}",
                                "is a log-scaled int interval, which the grid sampler cannot enumerate.",
                                "Use `choice(...)` or `range(...)` for a grid sweep, or another sampler (tpe).")
            else:
                raise UserError(f"{KEY_PREFIX}.{self.override_keys.get(name, name)}",
                                "is a continuous interval, which the grid sampler cannot enumerate.",
                                "Use `choice(...)` or `range(...)` for a grid sweep, or another sampler (tpe).")
        return grid


def parse_search_space(params: Mapping[str, Any], *, key_prefix: str = KEY_PREFIX) -> SearchSpace:
    """Parse ``hydra.sweeper.params`` into a :class:`SearchSpace`; every mistake is a :class:`UserError` naming
    ``<key_prefix>.<key>``.

    Values are normally strings in Hydra's grammar; YAML scalars (``seed: 3``, ``flag: true``, ``x: null``) are
    accepted as fixed values too, written back in Hydra's spelling.
    """
    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    fixed: dict[str, str] = {}
    override_keys: dict[str, str] = {}
    for raw_key, raw_value in params.items():
        key = str(raw_key).strip()
        where = f"{key_prefix}.{key}"
        text = _value_text(raw_value, where)
        override = _parse(f"{key}={text}", where)
        if override.is_delete():
            raise UserError(where, "deletes a key (`~`), which cannot be swept.",
                            "Remove it from the params, or delete the key in the base config.")
        name = override.get_key_element().lstrip("+")
        if name in override_keys:
            raise UserError(where, f"sets `{name}` a second time (also as `{override_keys[name]}`).",
                            "Keep one entry per config key.")
        override_keys[name] = override.get_key_element()
        if override.is_sweep_override():
            distributions[name] = _distribution(override, where)
        else:
            fixed[name] = text
    return SearchSpace(distributions=distributions, fixed=fixed, override_keys=override_keys)


def check_keys(space: SearchSpace, cfg: DictConfig, group_names: set[str]) -> None:
    """Refuse a param that names no key of the composed ``cfg`` and no config group: such a typo would otherwise
    fail in every trial (or, with ``+``, silently add an unused key). Keys written with ``+``/``++`` add keys on
    purpose and are not checked. Then :func:`check_values`."""
    known: list[str] | None = None
    for name in space.names():
        written = space.override_keys.get(name, name)
        if written.startswith("+"):
            continue
        key = name.split("@", 1)[0]
        if key in group_names or _has_key(cfg, key):
            continue
        if known is None:
            known = sorted({*_flat_keys(OmegaConf.to_container(cfg, resolve=False)), *group_names})
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"Did you mean `{close[0]}`?" if close else "See the keys with `lorasweep train --cfg job`."
        hint += " To add a new key on purpose, write it as `+" + key + "`."
        raise UserError(f"{KEY_PREFIX}.{written}", f"`{key}` is not a key of the config nor a config group.", hint)
    check_values(space, cfg, group_names)


#: Values of one categorical param that :func:`check_values` tries: all of a short list, else the first and last.
MAX_CHECKED_CHOICES = 16


def check_values(space: SearchSpace, cfg: DictConfig, group_names: set[str]) -> None:
    """Refuse a param with a value no run accepts (out of range, wrong type): each choice, each interval's
    bounds and each fixed value is set alone on ``cfg`` and validated as a run would validate it. Such a value
    would otherwise fail trial after trial until the failure budget stops the sweep. Combinations are not
    tried; config groups and ``+`` keys are left to the trials. Nothing is checked when ``cfg`` itself is
    refused: the caller reports that, under its own key."""
    import copy

    from lorasweep.config.errors import omegaconf_errors_as_user_errors
    from lorasweep.config.train import to_train_config

    try:
        to_train_config(cfg)
    except UserError:
        return
    for name in space.names():
        written = space.override_keys.get(name, name)
        key = name.split("@", 1)[0]
        if written.startswith("+") or "@" in name or key in group_names:
            continue
        where = f"{KEY_PREFIX}.{written}"
        dist = space.distributions.get(name)
        current = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if (isinstance(dist, optuna.distributions.FloatDistribution) and isinstance(current, int)
                and not isinstance(current, bool)):
            raise UserError(where, f"is a float interval, but `{key}` takes whole numbers.",
                            f"Write `int(interval({dist.low:g}, {dist.high:g}))`.")
        for value in _values_to_check(dist, space.fixed.get(name)):
            trial = copy.deepcopy(cfg)
            OmegaConf.set_struct(trial, False)  # free dicts (tracking.tags) take new keys; dataclass nodes never do
            try:
                with omegaconf_errors_as_user_errors():  # a value of the wrong type
                    OmegaConf.update(trial, key, value, merge=False)
                to_train_config(trial)
            except UserError as exc:
                verb, fix = (("includes", "Remove that value or narrow the range.") if dist is not None
                             else ("is", f"Give `{key}` a value a run accepts."))
                raise UserError(where, f"{verb} {format_value(value)}, which no run accepts: {exc.where}: "
                                f"{exc.problem.rstrip('.')}.", fix) from None


def _values_to_check(dist: optuna.distributions.BaseDistribution | None, fixed: str | None) -> list[Any]:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        choices = list(dist.choices)
        half = MAX_CHECKED_CHOICES // 2
        return choices if len(choices) <= MAX_CHECKED_CHOICES else choices[:half] + choices[-half:]
    if isinstance(dist, optuna.distributions.IntDistribution | optuna.distributions.FloatDistribution):
        return [dist.low, dist.high]
    if fixed is None:
        return []
    value = _parser().parse_override(f"k={fixed}").value()
    return [_plain(value)]


def format_value(value: Any) -> str:
    """Write one trial value in Hydra's override grammar so that Hydra parses it back to the same value and type:
    ``null``, ``true``/``false``, ints, floats by ``repr`` (exact round trip, ``inf``/``nan`` included), and
    strings bare when they are plain words Hydra reads as the same string, otherwise single-quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy.bool_ is not a bool subclass
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, str):
        if _BARE_STRING.fullmatch(value) and _reads_back_as(value, value):
            return value
        from hydra.core.override_parser.types import Quote, QuotedString

        return QuotedString(text=value, quote=Quote.single).with_quotes()
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} as a Hydra override")


@functools.cache
def _parser() -> OverridesParser:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _parse(line: str, where: str) -> Override:
    from hydra.errors import HydraException

    try:
        return _parser().parse_override(line)
    except HydraException as error:
        message = " ".join(str(error).split())
        raise UserError(where, f"is not valid Hydra sweep syntax: {message.rstrip('.')}.",
                        "Write e.g. `choice(4, 8, 16)`, `range(100, 400, step=100)`, `interval(1e-5, 1e-2)`, "
                        "`tag(log, interval(1e-5, 1e-2))` or a fixed value; quote strings with special characters."
                        ) from None


def _reads_back_as(text: str, value: str) -> bool:
    try:
        parsed = _parser().parse_override(f"k={text}")
    except Exception:
        return False
    return not parsed.is_sweep_override() and type(parsed.value()) is str and parsed.value() == value


def _value_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value.strip()
    if value is None or isinstance(value, (bool, int, float)):
        return format_value(value)
    raise UserError(where, f"has a {type(value).__name__} value; a param must be a sweep or a single value.",
                    "Write it as a string in Hydra's grammar, e.g. `choice(4, 8)` or `'[1,2]'` for a fixed list.")


def _distribution(override: Override, where: str) -> optuna.distributions.BaseDistribution:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    sweep = override.value()
    log = False
    if isinstance(sweep, (ChoiceSweep, RangeSweep, IntervalSweep)):
        unknown_tags = sorted(set(sweep.tags) - TAGS)
        if unknown_tags:
            raise UserError(where, f"has the unknown tag(s) {', '.join(unknown_tags)}.",
                            "The only tag with a meaning here is `log`, e.g. `tag(log, interval(1e-5, 1e-2))`.")
        log = "log" in sweep.tags
    if isinstance(sweep, ChoiceSweep):
        if log:
            raise UserError(where, "tags a choice() with `log`, which has no meaning for a list of values.",
                            "Remove the tag, or use `tag(log, interval(a, b))`.")
        return _categorical([_plain(item) for item in sweep.list], where)
    if isinstance(sweep, RangeSweep):
        return _range(sweep, log, where)
    if isinstance(sweep, IntervalSweep):
        return _interval(sweep, log, where)
    raise UserError(where, f"uses a {type(sweep).__name__.lower()}() sweep, which Optuna cannot search.",
                    "Use `choice(...)` with the option names listed, `range(...)` or `interval(...)`.")


def _categorical(choices: list[Any], where: str) -> optuna.distributions.CategoricalDistribution:
    for value in choices:
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise UserError(where, f"has the choice {value!r}; Optuna can only choose numbers, strings, booleans "
                            "or null.", "For lists or dicts, make a config group with one option per value.")
    seen: dict[Any, Any] = {}
    for value in choices:
        key = _NAN if _is_nan(value) else value  # 1, 1.0 and true are one key; nan never equals itself
        if key in seen:
            raise UserError(where, f"lists the equal values {format_value(seen[key])} and {format_value(value)}, "
                            "which Optuna cannot tell apart.", "List each value once.")
        seen[key] = value
    return optuna.distributions.CategoricalDistribution(choices)


def _range(sweep: Any, log: bool, where: str) -> optuna.distributions.BaseDistribution:
    from hydra.errors import HydraException

    try:
        produced = sweep.range()
        if isinstance(produced, range):
            values: list[Any] = [produced[0], produced[-1]] if len(produced) else []
        else:
            values = list(_take(produced, MAX_FLOAT_RANGE_VALUES + 1))
    except (ValueError, HydraException):
        raise UserError(where, f"is a range with step {sweep.step}, which produces no values.",
                        "Give a non-zero step, e.g. `range(100, 400, step=100)`.") from None
    if not values:
        raise UserError(where, f"is an empty range: range({sweep.start}, {sweep.stop}, step={sweep.step}) produces "
                        "no values (Hydra's range excludes its stop value).",
                        "Swap start and stop, flip the sign of step, or widen the range.")
    if isinstance(produced, range):
        low, high = min(values), max(values)
        step = abs(produced.step)
        if log and (step != 1 or low < 1):
            raise UserError(where, "tags a range with `log`; Optuna needs step 1 and values >= 1 for a log scale.",
                            "Use `tag(log, int(interval(low, high)))`, or drop the tag.")
        return optuna.distributions.IntDistribution(low, high, log=log, step=step)
    if log:
        raise UserError(where, "tags a float range with `log`, which has no meaning for a list of values.",
                        "Use `tag(log, interval(low, high))`, or drop the tag.")
    if len(values) > MAX_FLOAT_RANGE_VALUES:
        raise UserError(where, f"is a float range of more than {MAX_FLOAT_RANGE_VALUES} values.",
                        "Use `interval(low, high)` for a continuous search, or a larger step.")
    return _categorical(values, where)


def _interval(sweep: Any, log: bool, where: str) -> optuna.distributions.BaseDistribution:
    low, high = sweep.start, sweep.end
    if not all(isinstance(bound, (int, float)) and math.isfinite(bound) for bound in (low, high)):
        raise UserError(where, f"is interval({low}, {high}); both bounds must be finite numbers.",
                        "Write e.g. `interval(0.25, 1.0)`.")
    if low >= high:
        raise UserError(where, f"is interval({low}, {high}), whose low bound is not below its high bound.",
                        "Write the smaller bound first, and make them differ.")
    if log and low <= 0:
        raise UserError(where, f"is a log-scaled interval starting at {low}; a log scale needs a low bound > 0.",
                        "Raise the low bound (e.g. 1e-6), or drop the `log` tag.")
    if isinstance(low, int) and isinstance(high, int):
        return optuna.distributions.IntDistribution(low, high, log=log)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log)


def _take(values: Iterator[Any], limit: int) -> Iterator[Any]:
    for count, value in enumerate(values):
        if count >= limit:
            return
        yield value


def _plain(value: Any) -> Any:
    """A parsed choice element as a plain Python value (Hydra may keep quoted strings as ``QuotedString``)."""
    from hydra.core.override_parser.types import QuotedString

    return value.text if isinstance(value, QuotedString) else value


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` (a dotted path) exists in ``cfg``, also when its value is ``???`` or an interpolation that
    does not resolve yet (both are keys a sweep may well set)."""
    try:
        return OmegaConf.select(cfg, key, default=_NOT_FOUND, throw_on_missing=True) is not _NOT_FOUND
    except (MissingMandatoryValue, InterpolationResolutionError):
        return True


def _flat_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, child in node.items():
            path = f"{prefix}{key}"
            yield path
            yield from _flat_keys(child, path + ".")
