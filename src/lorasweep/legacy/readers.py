"""Read a legacy settings file into a flat ``{name: value}`` dict, as the tool that wrote it would read it.

- LETS JSON: one JSON object of LETS keys (``ArgStore.__dict__``);
- kohya TOML (``train_network.py --config_file``): ``key = value`` at the top level or in ``[sections]``,
  which kohya flattens (a section's name means nothing);
- kohya arguments: the ``--key value`` / ``--key=value`` / ``--flag`` text people keep in a ``.bat``/``.sh``
  file or paste from one (line continuations ``^``, ``\\`` and `````, quoting, and everything up to the
  ``train_network.py`` script, e.g. ``accelerate launch ...``, are handled).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasweep.errors import UserError

LETS_JSON = "LETS JSON"
KOHYA_TOML = "kohya TOML"
KOHYA_ARGS = "kohya arguments"


@dataclass(frozen=True)
class LegacyFile:
    """A legacy file's settings, by their names in the file, in file order."""

    path: Path
    kind: str
    """:data:`LETS_JSON`, :data:`KOHYA_TOML` or :data:`KOHYA_ARGS`."""

    values: dict[str, Any]
    ignored: list[str] = field(default_factory=list)
    """Parts of the file that are not settings (a launcher's own options), for the report."""


def read_legacy_file(path: Path, *, where: str | None = None) -> LegacyFile:
    """Read ``path``; ``where`` names the config key that pointed at it, for the error when it is missing."""
    if not path.is_file():
        problem = "is a folder, not a file." if path.is_dir() else "does not exist."
        raise UserError(where or str(path), f"{path} {problem}" if where else problem,
                        "Give a LETS .json, a kohya .toml config or a text file of train_network.py arguments.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(str(path), f"cannot be read as text ({exc}).", "") from None
    suffix = path.suffix.lower()
    if suffix == ".json" or (suffix not in (".toml",) and text.lstrip().startswith("{")):
        return LegacyFile(path, LETS_JSON, _read_json(path, text))
    if suffix == ".toml":
        return LegacyFile(path, KOHYA_TOML, _read_toml(path, text))
    try:
        values, ignored = parse_arguments(text)
    except ValueError as exc:
        raise UserError(str(path), f"{exc}.", "Close the quote.") from None
    if not values:
        raise UserError(str(path), "contains no --key value arguments, and is neither JSON nor TOML.",
                        "Give a LETS .json, a kohya .toml config or the train_network.py command line.")
    return LegacyFile(path, KOHYA_ARGS, values, ignored)


def _read_json(path: Path, text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(str(path), f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.",
                        "Fix the file (a LETS config is one JSON object of settings).") from None
    if not isinstance(data, dict):
        raise UserError(str(path), f"holds a JSON {type(data).__name__}, not an object of settings.",
                        "A LETS config is one JSON object, e.g. {\"net_dim\": 32, \"learning_rate\": 0.0001}.")
    return data


def _read_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(str(path), f"is not valid TOML: {exc}.", "Fix the file.") from None
    flat: dict[str, Any] = {}
    for name, item in data.items():  # kohya's read_config_from_file: sections only group, one level deep
        if isinstance(item, dict):
            flat.update(item)
        else:
            flat[name] = item
    return flat


_CONTINUATION = re.compile(r"[ \t]*(?:\^|\\|`)[ \t]*\r?\n")
_COMMENT = re.compile(r"^\s*(?:#|::|rem\b|REM\b)")


def parse_arguments(text: str) -> tuple[dict[str, Any], list[str]]:
    """``--key value`` pairs of every command line in ``text``; returns (values, ignored launcher parts).

    A key with no value is a flag (true); a key with several values (``--optimizer_args a=1 b=2``) gets the
    list. Backslashes are literal (Windows paths), quotes group words as in a shell.
    """
    values: dict[str, Any] = {}
    ignored: list[str] = []
    joined = _CONTINUATION.sub(" ", text)
    for line in joined.splitlines():
        if _COMMENT.match(line) or "--" not in line:
            continue
        lexer = shlex.shlex(line, posix=True)
        lexer.whitespace_split = True
        lexer.escape = ""
        lexer.commenters = ""
        try:
            tokens = list(lexer)
        except ValueError as exc:  # an unclosed quote
            raise ValueError(f"cannot split {line.strip()[:80]!r} into arguments: {exc}") from None
        for end in ("&&", "||", ";", "|", ">"):
            if end in tokens:
                tokens = tokens[: tokens.index(end)]
        script = next((i for i, t in enumerate(tokens) if t.lower().endswith(".py")), None)
        if script is not None:
            ignored.append(" ".join(tokens[: script + 1]))
            tokens = tokens[script + 1:]
        key: str | None = None
        for token in tokens:
            if token.startswith("--") and len(token) > 2:
                name, eq, val = token[2:].partition("=")
                name = name.replace("-", "_")
                if eq:
                    values[name] = val
                    key = None
                else:
                    values[name] = True
                    key = name
            elif key is not None:
                current = values[key]
                values[key] = token if current is True else [*current, token] if isinstance(current, list) \
                    else [current, token]
            else:
                ignored.append(token)
    return values, ignored
