"""The config keys a legacy setting may land on, with their types, read from the config dataclasses.

The importer never keeps its own list of lorasweep keys or types: a key is valid when it is a field of
:class:`~lorasweep.config.train.TrainConfig` (nested dataclasses give dotted keys), and a legacy value is
converted to that field's type here, so a new or retyped field is picked up without touching the table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from lorasweep.config.train import TrainConfig


class BadValue(ValueError):
    """A legacy value of the wrong type or outside what lorasweep can represent (fatal: the user must fix it)."""


@functools.cache
def leaf_types() -> dict[str, Any]:
    """Every leaf key of the config (``data.buckets.step``...) and its type hint. Fields typed ``dict[...]``
    (``optimizer.args``) are leaves: their keys are the user's."""
    found: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            else:
                found[f"{prefix}{f.name}"] = hint

    walk(TrainConfig, "")
    return found


def dict_field(key: str) -> str | None:
    """The ``dict``-typed field that ``key`` lies under (``optimizer.args`` for ``optimizer.args.d_coef``)."""
    types_ = leaf_types()
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in types_ and typing.get_origin(types_[head]) is dict:
            return head
    return None


def is_dict_field(key: str) -> bool:
    """``key`` is a field typed ``dict[...]`` (its entries are set one by one)."""
    hint = leaf_types().get(key)
    return hint is not None and typing.get_origin(_split_optional(hint)[0]) is dict


def is_key(key: str) -> bool:
    """A leaf config key, or a key inside a free ``dict`` field."""
    return key in leaf_types() or dict_field(key) is not None


def _split_optional(hint: Any) -> tuple[Any, bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(hint))
        return (args[0] if len(args) == 1 else hint), nullable
    return hint, False


def nullable(key: str) -> bool:
    """Whether the config key accepts null."""
    hint = leaf_types().get(key)
    return hint is None or _split_optional(hint)[1]


def describe(hint: Any) -> str:
    base, _ = _split_optional(hint)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if base in names:
        return names[base]
    origin = typing.get_origin(base)
    if origin is list:
        return f"a list of {describe(typing.get_args(base)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a table of key = value pairs"
    return str(base)


def _as_number(value: Any) -> float | None:
    """A number from an int, a float or a numeric string (legacy files write ``"1e-4"`` as often as 1e-4);
    None for anything else, booleans included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce(hint: Any, value: Any) -> Any:
    base, can_be_null = _split_optional(hint)
    if value is None:
        if can_be_null:
            return None
        raise BadValue(f"null is not allowed here; expected {describe(base)}")
    origin = typing.get_origin(base)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value  # exact, however large
        number = _as_number(value)
        if number is not None and number.is_integer():
            return int(number)
    elif base is float:
        number = _as_number(value)
        if number is not None and not math.isnan(number):
            return number
    elif base is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list | tuple):
            (item,) = typing.get_args(base)
            return [_coerce(item, v) for v in value]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            _, item = typing.get_args(base)
            return {k: _coerce(item, v) for k, v in value.items()}
    elif base is Any:
        return value
    raise BadValue(f"expected {describe(base)}, got {value!r}")


def coerce(key: str, value: Any) -> Any:
    """``value`` converted to the type of config key ``key``; :class:`BadValue` when it cannot be."""
    head = dict_field(key)
    if head is not None and head != key:
        _, item = typing.get_args(_split_optional(leaf_types()[head])[0])
        return _coerce(item, value)
    return _coerce(leaf_types()[key], value)


def to_bool(value: Any) -> bool:
    """A legacy flag: true/false (or their strings); null (not given) is false, as for kohya's store_true."""
    return False if value is None else bool(_coerce(bool, value))


def to_int(value: Any) -> int:
    """An integer (or its string)."""
    return int(_coerce(int, value))
