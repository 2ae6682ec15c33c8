"""Legacy settings: LoRA_Easy_Training_Scripts (LETS) JSON and kohya ``train_network.py`` TOML/arguments.

- :mod:`~lorasweep.legacy.mapping`: the one table from legacy names to config keys (and the seed's list);
- :mod:`~lorasweep.legacy.readers`: reading the three file kinds;
- :mod:`~lorasweep.legacy.convert`: settings → config values, Hydra overrides, a YAML config;
- :mod:`~lorasweep.legacy.lets`: a config → LETS JSON (``legacy.save_json_folder``/``save_json_only``);
- :mod:`~lorasweep.legacy.commands`: ``lorasweep import-legacy`` and ``lorasweep queue``.
"""

from lorasweep.legacy.convert import Conversion, convert_file
from lorasweep.legacy.lets import save_config_files, write_lets_json

__all__ = ["Conversion", "convert_file", "save_config_files", "write_lets_json"]
