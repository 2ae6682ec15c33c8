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


def render() -> str:
    lines = ["# Parameters", "",
             "Generated from the config dataclasses in `src/lorasweep/config/` by "
             "`python -m lorasweep.config.docs`; do not edit by hand.", ""]
    from hydra_plugins.lorasweep_optuna.config import LorasweepOptunaConf
    from hydra_plugins.lorasweep_optuna.process_launcher import LorasweepProcessLauncherConf

    hints_root = typing.get_type_hints(TrainConfig)
    sections = [(group, hints_root[group]) for group in (*GROUPS, *EXTRA_NODES)]
    sections += [("hydra.sweeper", LorasweepOptunaConf), ("hydra.launcher", LorasweepProcessLauncherConf)]
    for group, cls in sections:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        lines += [f"## `{group}`", "", " ".join((cls.__doc__ or "").split()), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            if field.name == "_target_":
                continue
            type_name = str(hints[field.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            type_name = type_name.replace("|", "\\|")
            doc = docs.get(field.name, "").replace("|", "\\|")
            lines.append(f"| `{group}.{field.name}` | `{type_name}` | {_default(field)} | {doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
