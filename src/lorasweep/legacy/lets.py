"""Write a config as a LETS JSON (``legacy.save_json_folder``) and as a YAML config (``save_json_only``).

The JSON has every LETS key of the table (so LETS and people reading it see the familiar names) plus an
extra ``"lorasweep"`` object with each setting the LETS keys do not carry exactly (LETS ignores unknown
keys); reading it back with ``legacy.load_json_path`` gives the same config.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lorasweep.config.train import TrainConfig
from lorasweep.errors import UserError
from lorasweep.legacy import schema
from lorasweep.legacy.convert import EXTRA_BLOCK, convert, render_yaml
from lorasweep.legacy.mapping import TABLE, get
from lorasweep.legacy.readers import LETS_JSON, LegacyFile
from lorasweep.tracking.files import atomic_write_text

_NOT_FROM_FILES = ("trial.", "legacy.")
"""Never written to the extra block: set by the sweeper, or by the command line that loads the file."""


def config_values(cfg: TrainConfig) -> dict[str, Any]:
    """Every leaf value of ``cfg`` by dotted key (``dict`` fields as one value)."""
    return {key: _plain(get(cfg, key)) for key in schema.leaf_types()}


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_lets_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The LETS JSON object for ``cfg``: LETS keys first, then the ``lorasweep`` block (see module doc)."""
    lets = {row.lets: row.export(cfg) for row in TABLE if row.lets and row.export is not None}
    implied = convert(LegacyFile(Path("<export>"), LETS_JSON, lets)).values()
    for key in list(implied):  # gather free-dict entries back into their dict
        head = schema.dict_field(key)
        if head is not None and head != key:
            implied.setdefault(head, {})[key[len(head) + 1:]] = implied.pop(key)
    extra = {key: value for key, value in config_values(cfg).items()
             if not key.startswith(_NOT_FROM_FILES) and (key not in implied or implied[key] != value)}
    return {**lets, EXTRA_BLOCK: extra}


def _free_stem(folder: Path, name: str, suffixes: tuple[str, ...]) -> str:
    stem, n = name, 0
    while any((folder / f"{stem}{s}").exists() for s in suffixes):
        n += 1
        stem = f"{name}_{n}"
    return stem


def _folder(folder: Path) -> Path:
    folder = folder.expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError("legacy.save_json_folder", f"cannot create {folder} ({exc.strerror or exc}).",
                        "Choose a folder you can write to.") from None
    return folder


def write_lets_json(cfg: TrainConfig, folder: Path, name: str) -> Path:
    """Write ``cfg`` as ``<folder>/<name>.json`` (LETS keys + the ``lorasweep`` block); returns the path.

    Atomic, and never overwrites: when ``<name>.json`` (or a ``<name>.yaml`` beside it) exists, ``name_1``,
    ``name_2``... is used. The folder is created if needed.
    """
    folder = _folder(folder)
    text = json.dumps(to_lets_dict(cfg), indent=4, ensure_ascii=False) + "\n"
    while True:
        path = folder / f"{_free_stem(folder, name, ('.json', '.yaml'))}.json"
        try:
            atomic_write_text(path, text, overwrite=False)
            return path
        except (UserError, FileExistsError):  # another process took the name meanwhile
            continue


def config_yaml(cfg: TrainConfig, header: list[str]) -> str:
    """``cfg`` as a YAML config for ``--config-dir/--config-name``: every value, no legacy loading/only-save."""
    values = {k: v for k, v in config_values(cfg).items()
              if not k.startswith("trial.") and k not in ("legacy.load_json_path", "legacy.json_load_skip_list",
                                                          "legacy.save_json_only")}
    return render_yaml(values, header)


def save_config_files(cfg: TrainConfig) -> tuple[Path, Path]:
    """``legacy.save_json_only``: the LETS JSON and the resolved YAML config into ``legacy.save_json_folder``."""
    if not cfg.legacy.save_json_folder:
        raise UserError("legacy.save_json_only", "is true but legacy.save_json_folder is null, so there is "
                        "nowhere to write the files.", "Add legacy.save_json_folder=<folder>.")
    folder = _folder(Path(cfg.legacy.save_json_folder))
    name = f"{cfg.output.run_name}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    json_path = write_lets_json(cfg, folder, name)
    yaml_path = json_path.with_suffix(".yaml")
    header = [f"lorasweep config written with legacy.save_json_only on {time.strftime('%Y-%m-%d %H:%M:%S')};",
              f"the same settings as {json_path.name}. Train with:",
              f"  lorasweep train --config-dir {folder} --config-name {json_path.stem}"]
    atomic_write_text(yaml_path, config_yaml(cfg, header), overwrite=False)
    return json_path, yaml_path
