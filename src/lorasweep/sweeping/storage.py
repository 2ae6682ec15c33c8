"""Where a sweep's Optuna study lives, and the ``sweep.json`` record that finds it again.

A storage is named by one string so that it can travel in configs, in ``sweep.json`` and to trial
processes: ``journal:///abs/path/optuna.journal`` (Optuna's JournalStorage on a file: no server, safe across
processes on one machine or a shared file system; the default, in the sweep folder) or any SQLAlchemy URL
Optuna's ``RDBStorage`` accepts (``sqlite:///...``, ``postgresql://...``, ``mysql://...``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasweep.errors import UserError
from lorasweep.tracking.files import atomic_write_text

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

JOURNAL_SCHEME = "journal://"
JOURNAL_FILE = "optuna.journal"
RECORD_FILE = "sweep.json"


def journal_url(path: Path) -> str:
    """The storage string of a journal file (absolute, so trial processes in other folders find it)."""
    return f"{JOURNAL_SCHEME}{Path(path).resolve()}"


def open_storage(url: str, *, key: str = "hydra.sweeper.storage") -> BaseStorage:
    """Open ``url`` as an Optuna storage; a URL that cannot be opened is a :class:`UserError` naming ``key``."""
    import optuna

    if url.startswith(JOURNAL_SCHEME):
        path = Path(url[len(JOURNAL_SCHEME):])
        if not path.parent.is_dir():
            raise UserError(key, f"the folder of the journal file {path} does not exist.",
                            "Create it, or give another `journal:///abs/path/file.journal` or an RDB URL.")
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        try:
            backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
            return optuna.storages.JournalStorage(backend)
        except OSError as error:
            raise UserError(key, f"cannot open the journal file {path}: {error}.",
                            "Check that the folder is writable.") from None
    if "://" not in url:
        raise UserError(key, f"{url!r} is not a storage URL.",
                        "Use `journal:///abs/path/optuna.journal` or an SQLAlchemy URL such as "
                        "`sqlite:////abs/path/optuna.db` or `postgresql://user@host/db`.")
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=None)
    except Exception as error:  # SQLAlchemy raises many types: unknown dialect, refused connection, ...
        from lorasweep.tracking.redact import redact_value

        # The URL's password stays out of the message, which ends up in terminals, CI logs and bug reports.
        text = redact_value(f"cannot open the Optuna storage {url!r}: {type(error).__name__}: {error}", [])
        raise UserError(key, text.rstrip(".") + ".",
                        "Check the URL, that its driver is installed, and that the server is reachable.") from None


@dataclass
class SweepRecord:
    """``<sweep folder>/sweep.json``: all that ``lorasweep report`` and a resumed sweep need to find the study
    and the MLflow parent run again."""

    study_name: str
    storage: str
    objectives: list[str]
    directions: list[str]
    params: list[str] = field(default_factory=list)
    """The swept config keys (the search space), in the order they are shown in the leaderboard."""
    mlflow: dict[str, str] = field(default_factory=dict)
    """``tracking_uri``, ``experiment_id``, ``parent_run_id`` when tracking is on; empty otherwise."""

    def write(self, sweep_dir: Path) -> Path:
        path = Path(sweep_dir) / RECORD_FILE
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, sweep_dir: Path) -> SweepRecord:
        path = Path(sweep_dir) / RECORD_FILE
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            raise UserError(str(path), "is missing: this is not a lorasweep sweep folder.",
                            "Give the folder a `lorasweep sweep` or `lorasweep train -m` run printed at its end.") \
                from None
        except (ValueError, TypeError) as error:
            raise UserError(str(path), f"cannot be read: {error}.", "It was written by lorasweep; restore it or "
                            "rebuild it by re-running the sweep command.") from None
