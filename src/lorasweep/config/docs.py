"""Generate ``docs/parameters.md`` from the config dataclasses (keys, types, defaults, field docstrings).

Run ``python -m lorasweep.config.docs > docs/parameters.md``; a test keeps the file in step with the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import typing
from collections.abc import Iterator

from lorasweep.config.train import EXTRA_NODES, GROUPS, TrainConfig


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written right after each field (the attribute-docstring convention)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(field: dataclasses.Field[object]) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return "null" if value is None else f"`{value!r}`".replace("'", '"')


def _type_name(hint: object) -> str:
    text = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(cls: type, prefix: str) -> Iterator[tuple[str, dataclasses.Field[object], object, str]]:
    """(dotted key, field, type, docstring) of every leaf field; nested dataclasses give ``a.b.c`` rows."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name == "_target_":
            continue
        hint = hints[field.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from _rows(hint, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", field, hint, docs.get(field.name, "")


def _nested_docs(cls: type, prefix: str) -> list[str]:
    """One line per nested dataclass field: its key and what it groups."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            about = " ".join(f"{docs.get(field.name, '')} {' '.join((hint.__doc__ or '').split())}".split())
            lines += [f"`{prefix}{field.name}.*`: {about}", "", *_nested_docs(hint, f"{prefix}{field.name}.")]
    return lines


def _legacy_section() -> list[str]:
    from lorasweep.legacy.mapping import SEED_NAME, TABLE

    lines = ["## Legacy settings", "",
             "How `lorasweep import-legacy FILE`, `legacy.load_json_path` and `lorasweep queue DIR` read "
             "LoRA_Easy_Training_Scripts (LETS) JSON keys (the seed's parameter list; the seed article's "
             "machine-translated names in brackets) and kohya `train_network.py` arguments (TOML "
             "`--config_file` or command line). Settings a file does not give keep lorasweep's defaults; "
             "unknown ones are reported, not fatal; a value of the wrong type stops with the setting named.", "",
             "| LETS key | kohya argument | lorasweep | note |", "|---|---|---|---|"]
    for row in TABLE:
        lets = "" if row.lets is None else f"`{row.lets}`"
        if row.lets in SEED_NAME and SEED_NAME[row.lets] != row.lets:
            lets += f" (`{SEED_NAME[row.lets]}`)"
        lets += "".join(f", `{alias}`" for alias in row.aliases)
        kohya = "" if row.kohya is None else f"`--{row.kohya}`"
        target = ", ".join(f"`{t}`" for t in row.targets) or (f"`{row.command}`" if row.command else "—")
        lines.append(f"| {lets} | {kohya} | {target} | {_cell(row.reason)} |")
    lines.append("")
    return lines


def render() -> str:
    from hydra_plugins.lorasweep_optuna.config import LorasweepOptunaConf
    from hydra_plugins.lorasweep_optuna.process_launcher import LorasweepProcessLauncherConf
    from lorasweep.legacy.mapping import legacy_names

    lines = ["# Parameters", "",
             "Generated from the config dataclasses in `src/lorasweep/config/` and the legacy mapping in "
             "`src/lorasweep/legacy/mapping.py` by `python -m lorasweep.config.docs`; do not edit by hand.", "",
             "The *legacy* column gives the name of each key in the seed's parameter list (where it differs), "
             "in LoRA_Easy_Training_Scripts JSON (LETS) and in kohya `train_network.py`.", ""]
    hints_root = typing.get_type_hints(TrainConfig)
    sections: list[tuple[str, type]] = [(group, hints_root[group]) for group in (*GROUPS, *EXTRA_NODES)]
    sections += [("hydra.sweeper", LorasweepOptunaConf), ("hydra.launcher", LorasweepProcessLauncherConf)]
    for group, cls in sections:
        lines += [f"## `{group}`", "", " ".join((cls.__doc__ or "").split()), "", *_nested_docs(cls, f"{group}."),
                  "| key | type | default | legacy | meaning |", "|---|---|---|---|---|"]
        for key, field, hint, doc in _rows(cls, f"{group}."):
            legacy = ", ".join(legacy_names(key)) if not group.startswith("hydra.") else ""
            lines.append(f"| `{key}` | `{_type_name(hint)}` | {_default(field)} | {legacy} | {_cell(doc)} |")
        lines.append("")
    lines += _legacy_section()
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
