"""Turn a legacy file's settings into lorasweep config values, Hydra overrides or a YAML config.

Every setting ends up in exactly one of two lists: mapped (legacy name → config key = value) or not applied
(with the reason). Unknown names are reported, never fatal; a value of the wrong type is fatal and names
the setting and the file.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasweep.config.train import GROUPS
from lorasweep.errors import UserError
from lorasweep.legacy import schema
from lorasweep.legacy.mapping import BY_KOHYA, BY_LETS, Context, LegacyKey, Skip
from lorasweep.legacy.readers import KOHYA_ARGS, LETS_JSON, LegacyFile, read_legacy_file
from lorasweep.legacy.schema import BadValue

EXTRA_BLOCK = "lorasweep"
"""Key of a LETS JSON object holding the settings LETS has no key for (dotted lorasweep keys), written by
:func:`lorasweep.legacy.lets.write_lets_json` so that the file re-imports to the same config."""


@dataclass(frozen=True)
class Mapped:
    source: str
    """The setting's name in the file (``lorasweep.<key>`` for the extra block)."""

    key: str
    """The lorasweep config key it sets."""

    value: Any


@dataclass(frozen=True)
class NotApplied:
    source: str
    reason: str


@dataclass(frozen=True)
class Conversion:
    """What a legacy file becomes: config values, in file order, and what was left out and why."""

    path: Path
    kind: str
    mapped: tuple[Mapped, ...]
    not_applied: tuple[NotApplied, ...]

    def values(self) -> dict[str, Any]:
        """Config key → value (a later setting of the same key wins: the extra block over LETS keys)."""
        return {m.key: m.value for m in self.mapped}

    def source_of(self, key: str) -> Mapped | None:
        """The setting that gave ``key`` its value."""
        found = [m for m in self.mapped if m.key == key]
        return found[-1] if found else None

    def blame(self, exc: UserError, user_overrides: Sequence[str] = ()) -> UserError:
        """``exc`` (a config error) with the setting of this file behind its key named, unless one of the
        user's own overrides set that key."""
        mine = {o.split("=", 1)[0].lstrip("+~") for o in user_overrides}
        for m in reversed(self.mapped):
            if m.key not in mine and re.search(rf"(?<![\w.]){re.escape(m.key)}(?![\w.])", exc.where):
                return UserError(f"{exc.where} (set by {m.source} in {self.path})", exc.problem, exc.hint)
        return exc

    def overrides(self, user_overrides: Sequence[str] = ()) -> list[str]:
        """Hydra overrides that apply this file; put them *before* the user's so that the user's win.

        ``<group>.name`` becomes the group choice (``scheduler=cosine``) when ``conf/`` has that option, so
        a later ``scheduler=linear`` wins as usual; otherwise a user's group choice drops it.
        """
        chosen = _chosen_groups(user_overrides)
        result = []
        for key, value in self.values().items():
            group_choice = _group_choice(key, value)
            if group_choice is not None:
                if group_choice[0] in chosen:
                    continue
                if group_choice[1]:
                    result.append(f"{group_choice[0]}={value}")
                    continue
            prefix = "++" if schema.dict_field(key) not in (None, key) else ""
            result.append(f"{prefix}{key}={hydra_value(value)}")
        return result


def _group_choice(key: str, value: Any) -> tuple[str, bool] | None:
    """(group, whether conf/<group>/<value>.yaml exists) for a ``<group>.name`` key, else None."""
    group, _, name = key.partition(".")
    if name != "name" or group not in GROUPS or not isinstance(value, str):
        return None
    from lorasweep.config.paths import conf_dir

    return group, bool(re.fullmatch(r"[\w\-]+", value)) and (conf_dir() / group / f"{value}.yaml").is_file()


def _chosen_groups(overrides: Iterable[str]) -> set[str]:
    """Config groups the user picks an option of (``scheduler=cosine``)."""
    chosen = set()
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        if "=" in text and key in GROUPS:
            chosen.add(key)
    return chosen


def _escape_interpolation(text: str) -> str:
    r"""OmegaConf reads ``${...}`` as an interpolation; ``\${`` is a literal one (backslashes before it double)."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


@functools.cache
def _reads_back_unquoted(text: str) -> bool:
    """Whether Hydra reads ``text`` unquoted as this very string (quotes only where needed: readable)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if not re.fullmatch(r"[\w/.:\-]+", text):  # no backslashes: in a list, `\,` escapes the comma
        return False
    try:
        parsed = OverridesParser.create().parse_override(f"k={text}").value()
    except HydraException:
        return False
    return isinstance(parsed, str) and parsed == text


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, so that it arrives unchanged (quotes, backslashes, ``${``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if _reads_back_unquoted(value):
            return value
        # Hydra: in a quoted string only backslashes before a quote or the end are escapes.
        text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""),
                      _escape_interpolation(value))
        return f"'{text}'"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(k, str) and re.fullmatch(r"[A-Za-z_][\w\-]*", k) for k in value):
            raise BadValue(f"{value!r}: keys must be plain names")
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise BadValue(f"{value!r} cannot be given to lorasweep")


def yaml_value(value: Any) -> Any:
    """``value`` for a YAML config Hydra will load (strings escaped against interpolation)."""
    if isinstance(value, str):
        return _escape_interpolation(value)
    if isinstance(value, list | tuple):
        return [yaml_value(v) for v in value]
    if isinstance(value, dict):
        return {k: yaml_value(v) for k, v in value.items()}
    return value


def render_yaml(values: dict[str, Any], header: Sequence[str]) -> str:
    """A config for ``lorasweep train --config-dir DIR --config-name NAME``: ``train`` with these values.

    Group names with an option in ``conf/`` become ``override /<group>: <option>`` defaults, so a group choice
    on the command line still wins (a ``scheduler.name`` in the body would beat ``scheduler=linear``).
    """
    import yaml

    defaults: list[Any] = ["train"]
    body: dict[str, Any] = {}
    for key, value in values.items():
        choice = _group_choice(key, value)
        if choice is not None and choice[1]:
            defaults.append({f"override /{choice[0]}": value})
            continue
        node = body
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml_value(value)
    defaults.append("_self_")
    text = yaml.safe_dump({"defaults": defaults, **body}, sort_keys=False, allow_unicode=True, width=120)
    return "".join(f"# {line}\n" if line else "#\n" for line in header) + text


def _lookup(name: str, kind: str) -> tuple[LegacyKey | None, str]:
    """The row for ``name`` and whether it is read as a LETS key or a kohya argument (a JSON may hold kohya
    names, as kohya_ss GUI files do; those keep kohya's meaning, e.g. max_train_epochs over max_train_steps)."""
    if kind == LETS_JSON and name in BY_LETS:
        return BY_LETS[name], "lets"
    return BY_KOHYA.get(name), "kohya"


def _skipped(name: str, row: LegacyKey | None, skip: set[str]) -> str | None:
    """The skip-list entry that names this setting (by its name, its LETS/kohya name or a target key)."""
    names = {name} if row is None else {name, row.lets, row.kohya, *row.aliases, *row.targets}
    hit = sorted(skip & {n for n in names if n})
    return hit[0] if hit else None


def convert_file(path: Path, skip: Iterable[str] = (), *, where: str | None = None) -> Conversion:
    """Read and convert a LETS JSON, kohya TOML or kohya argument file (``skip``: names not to load)."""
    return convert(read_legacy_file(path, where=where), skip)


def convert(legacy: LegacyFile, skip: Iterable[str] = ()) -> Conversion:
    skip_set = set(skip)
    used: set[str] = set()
    mapped: list[Mapped] = []
    not_applied = [NotApplied(part, "launcher argument, not a train_network.py setting") for part in legacy.ignored
                   if legacy.kind == KOHYA_ARGS]
    owner: dict[str, Mapped] = {}
    for name, raw in legacy.values.items():
        if name == EXTRA_BLOCK and legacy.kind == LETS_JSON:
            continue
        row, reading = _lookup(name, legacy.kind)
        hit = _skipped(name, row, skip_set)
        if hit is not None:
            used.add(hit)
            not_applied.append(NotApplied(name, f"skipped ({hit} is in the skip list)"))
            continue
        if row is None:
            not_applied.append(NotApplied(name, "unknown setting: lorasweep has no equivalent"))
            continue
        try:
            pairs = row.convert(raw, Context(reading, legacy.values)) if row.convert else []
        except Skip as why:
            not_applied.append(NotApplied(name, str(why)))
            continue
        except BadValue as exc:
            raise _bad(legacy, name, str(exc)) from None
        for key, value in pairs:
            earlier = owner.get(key)
            if earlier is not None and earlier.value != value:
                raise UserError(f"{legacy.path}: {earlier.source} and {name}",
                                f"disagree on {key} ({earlier.value!r} vs {value!r}).",
                                "Remove one of them from the file (or skip it).")
            owner[key] = Mapped(name, key, value)
            mapped.append(owner[key])
    extra = legacy.values.get(EXTRA_BLOCK) if legacy.kind == LETS_JSON else None
    if extra is not None:
        mapped += _convert_extra(legacy, extra, skip_set, used, not_applied)
    not_applied += [NotApplied(entry, "this skip-list entry matches no setting in the file")
                    for entry in sorted(skip_set - used)]
    return Conversion(legacy.path, legacy.kind, tuple(mapped), tuple(not_applied))


def _convert_extra(legacy: LegacyFile, extra: Any, skip: set[str], used: set[str],
                   not_applied: list[NotApplied]) -> list[Mapped]:
    if not isinstance(extra, dict):
        raise _bad(legacy, EXTRA_BLOCK, f"expected an object of lorasweep keys, got {extra!r}")
    mapped = []
    for key, raw in extra.items():
        source = f"{EXTRA_BLOCK}.{key}"
        if key in skip or source in skip:
            used.add(key if key in skip else source)
            not_applied.append(NotApplied(source, "skipped (in the skip list)"))
        elif not isinstance(key, str) or not schema.is_key(key):
            not_applied.append(NotApplied(source, "no such config key in this lorasweep version"))
        elif key.split(".")[0] in ("trial", "legacy"):
            not_applied.append(NotApplied(source, "set by the sweeper or the command line, not by a file"))
        else:
            try:
                value = schema.coerce(key, raw)
                if schema.is_dict_field(key):  # a free dict: one override per entry
                    mapped += [Mapped(source, f"{key}.{k}", v) for k, v in value.items()]
                else:
                    mapped.append(Mapped(source, key, value))
            except BadValue as exc:
                raise _bad(legacy, source, str(exc)) from None
    return mapped


def _bad(legacy: LegacyFile, name: str, problem: str) -> UserError:
    hint = ("Fix the value, or leave the setting out (legacy.json_load_skip_list / import-legacy --skip).")
    return UserError(f"{legacy.path}: {name}", f"{problem}.", hint)
