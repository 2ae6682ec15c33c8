"""Turn OmegaConf/Hydra composition errors into one clear ``UserError`` paragraph."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


def _known_keys(object_type: type | None) -> str:
    if object_type is None or not dataclasses.is_dataclass(object_type):
        return ""
    return ", ".join(f.name for f in dataclasses.fields(object_type))


def describe_omegaconf_error(exc: OmegaConfBaseException) -> tuple[str, str, str]:
    """Return (key, problem, hint) for an OmegaConf error raised while merging or converting a config."""
    full_key = getattr(exc, "full_key", None) or "config"
    msg = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
    if isinstance(exc, ConfigKeyError | ConfigAttributeError):
        parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
        keys = _known_keys(getattr(exc, "object_type", None))
        where = f" of {parent}" if parent else ""
        hint = f"Known keys{where}: {keys}." if keys else "Check the spelling against `lorasweep train --cfg job`."
        return full_key, "no such config key.", hint
    if isinstance(exc, ValidationError):
        return full_key, msg.rstrip(".") + ".", "Give a value of the documented type (see docs/parameters.md)."
    return full_key, msg, "See `lorasweep train --cfg job` for the composed config."


@contextmanager
def omegaconf_errors_as_user_errors() -> Iterator[None]:
    from lorasweep.errors import UserError

    try:
        yield
    except OmegaConfBaseException as exc:
        raise UserError(*describe_omegaconf_error(exc)) from None
