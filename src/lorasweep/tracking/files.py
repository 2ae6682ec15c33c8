"""Atomic file writes: a reader (or a crash) never sees a half-written file, and nothing is clobbered."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lorasweep.errors import UserError


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write to a temporary sibling, fsync, rename. ``overwrite=False`` refuses to replace a file."""
    if not overwrite and path.exists():
        raise UserError(str(path), "already exists and would be overwritten.",
                        "Choose another name or move the existing file away.")
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path appeared meanwhile: never replaces a user's file
            tmp.unlink()
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str, *, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def create_unique_dir(path: Path) -> Path:
    """Create ``path`` (or ``path_1``, ``path_2`` ...) exclusively: an existing folder is never reused."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError("output.root", f"cannot create {path.parent} ({exc.strerror}).",
                        "Choose a writable folder with `output.root=<path>`.") from None
    candidate, n = path, 0
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}_{n}")
        except OSError as exc:
            raise UserError("output.root", f"cannot create {candidate} ({exc.strerror}).",
                            "Choose a writable folder with `output.root=<path>`.") from None


def install_dir(tmp: Path, target: Path) -> None:
    """Put a fully written temporary folder at ``target`` by rename, so readers see the old folder or the
    new one, never a half-written one. A folder already at ``target`` (incomplete or outdated: callers
    decide) is moved aside first and then deleted."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a cache folder should be readable like any folder
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=target.parent))
        os.replace(target, aside / "old")
        os.replace(tmp, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, target)
