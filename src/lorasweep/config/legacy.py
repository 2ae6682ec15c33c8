"""The ``legacy`` node: LoRA_Easy_Training_Scripts (LETS) JSON and kohya config files in and out.

The behaviour lives in :mod:`lorasweep.legacy` (the mapping table, readers and writers) and in
:func:`lorasweep.app.compose`, which applies ``load_json_path`` while the config is composed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorasweep.errors import UserError


@dataclass
class LegacyConfig:
    """Settings from, and to, LETS JSON files (the flat key set of the seed parameter list) and kohya
    ``train_network.py`` configs. ``lorasweep import-legacy FILE`` shows what a file maps to."""

    load_json_path: str | None = None
    """Fill settings from this file while the config is composed: a LETS JSON, a kohya ``--config_file``
    TOML, or a text file of ``train_network.py`` arguments. Command-line overrides still win over it (the
    file's values beat those of a ``--config-name`` YAML, though). Unknown settings are reported, a value of
    the wrong type stops with the setting and file named. Seed/LETS ``load_json_path``; kohya
    ``--config_file``."""

    json_load_skip_list: list[str] = field(default_factory=list)
    """Settings of that file not to load, by their name in the file (LETS key or kohya argument) or by the
    lorasweep key they set, e.g. ``[base_model,img_folder,output_folder]`` to reuse settings with new paths."""

    save_json_folder: str | None = None
    """Also write this run's settings as a LETS JSON into that folder (never overwriting a file). Besides
    the LETS keys the file has a ``lorasweep`` object with every setting LETS has no key for, so loading it
    with ``load_json_path`` gives the same config."""

    save_json_only: bool = False
    """Write the LETS JSON and the resolved YAML config (usable with ``--config-dir/--config-name``) into
    ``save_json_folder`` and exit without training or creating a run folder. Single runs only."""

    def validate(self, key: str = "legacy") -> None:
        if self.load_json_path is not None and not self.load_json_path.strip():
            raise UserError(f"{key}.load_json_path", "is empty.", "Give a file, or null to load none.")
        if any(not entry.strip() for entry in self.json_load_skip_list):
            raise UserError(f"{key}.json_load_skip_list", "has an empty entry.",
                            "List setting names, e.g. [base_model,img_folder].")
        if self.save_json_only and not self.save_json_folder:
            raise UserError(f"{key}.save_json_only", "is true but legacy.save_json_folder is null, so there is "
                            "nowhere to write the files.", f"Add {key}.save_json_folder=<folder>.")
