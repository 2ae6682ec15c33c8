"""The ``legacy`` node: LoRA_Easy_Training_Scripts (LETS) JSON configs in and out."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LegacyConfig:
    """Settings from, and to, LETS JSON files (the flat key set of the seed parameter list)."""

    load_json_path: str | None = None
    """Fill settings from this LETS JSON (or kohya TOML) before command-line overrides apply."""

    json_load_skip_list: list[str] = field(default_factory=list)
    """Keys of that file not to load (LETS names, e.g. ``[base_model, img_folder, output_folder]``)."""

    save_json_folder: str | None = None
    """Also write this run's settings as a LETS JSON into that folder."""

    save_json_only: bool = False
    """Write the config files (LETS JSON and resolved YAML) and exit without training."""

    def validate(self, key: str = "legacy") -> None:
        return None
