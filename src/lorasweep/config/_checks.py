"""Small value checks shared by every config group; each raises a ``UserError`` naming the key."""

from __future__ import annotations

from collections.abc import Iterable

from lorasweep.errors import UserError


def check_range(
    key: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    too_low = low is not None and (value < low or (not low_inclusive and value == low))
    too_high = high is not None and (value > high or (not high_inclusive and value == high))
    if too_low or too_high:
        lo = "" if low is None else ("[" if low_inclusive else "(") + f"{low}"
        hi = "" if high is None else f"{high}" + ("]" if high_inclusive else ")")
        bounds = f"{lo or '(-inf'}, {hi or 'inf)'}"
        raise UserError(key, f"{value!r} is out of range; it must lie in {bounds}.",
                        f"Set it with `{key}=<value>` on the command line or in your YAML.")


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    options = tuple(choices)
    if value not in options:
        raise UserError(key, f"{value!r} is not one of {', '.join(options)}.",
                        f"Choose one, e.g. `{key}={options[0]}`.")
