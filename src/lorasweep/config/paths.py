"""Locate the shipped config folders, both in a source checkout (editable install) and in a wheel."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def conf_dir() -> Path:
    """``conf/``: inside the installed package (wheel) or at the repository root (editable/source)."""
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"lorasweep's conf/ folder is missing next to {_PACKAGE_DIR}; reinstall lorasweep.")


def sweeps_dir() -> Path:
    """``sweeps/`` (the sweep presets): inside the installed package or at the repository root."""
    for candidate in (_PACKAGE_DIR / "sweeps", _PACKAGE_DIR.parent.parent / "sweeps"):
        if (candidate / "quickstart.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"lorasweep's sweeps/ folder is missing next to {_PACKAGE_DIR}; reinstall lorasweep.")


def cache_root(cache_dir: str | None) -> Path:
    """Where built models and generated data live: ``model.cache_dir``, ``$LORASWEEP_CACHE_DIR`` or
    ``~/.cache/lorasweep``. Shared by every run on the machine; never part of a result."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LORASWEEP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorasweep"
