"""Test-only fault injection, so failure paths can be tested on a machine without a GPU and without really
filling a disk. ``LORASWEEP_FAULT`` holds one or more ``;``-separated faults:

* ``oom:step=10[:trial=1]`` raises a CUDA out-of-memory error (``torch.OutOfMemoryError``) when training logs
  that step (in that sweep trial only);
* ``kill:step=10`` ends the process with SIGKILL there (a crash nothing can clean up after);
* ``barrier:step=10:dir=D`` creates ``D/reached-10`` there and waits until ``D/go-10`` exists, so a test can
  act (stop a server, fill a disk) at a known point of a run in another process;
* ``enospc:file=NAME`` makes the write of any LoRA file or training state whose name contains ``NAME`` fail
  half-way with "No space left on device", after part of its temporary file was written;
* any other kind raises ``RuntimeError`` at its step.

Unset in normal use; reading one variable costs nothing.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

ENV = "LORASWEEP_FAULT"
BARRIER_TIMEOUT_S = 600.0


def _faults() -> list[tuple[str, dict[str, str]]]:
    faults = []
    for spec in filter(None, os.environ.get(ENV, "").split(";")):
        kind, *fields = spec.split(":")
        faults.append((kind, dict(field.split("=", 1) for field in fields)))
    return faults


def inject(step: int, trial_number: int | None) -> None:
    """Called each time training logs ``step``."""
    for kind, options in _faults():
        if kind == "enospc" or int(options.get("step", -1)) != step:
            continue
        if "trial" in options and (trial_number is None or int(options["trial"]) != trial_number):
            continue
        if kind == "barrier":
            _barrier(Path(options["dir"]), step)
            continue
        if kind == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {ENV})")
        raise RuntimeError(f"injected fault ({ENV}: {kind} at step {step})")


def _barrier(folder: Path, step: int) -> None:
    (folder / f"reached-{step}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while not (folder / f"go-{step}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ENV} barrier at step {step}: nobody created {folder / f'go-{step}'}")
        time.sleep(0.05)


def on_write(target: Path, written: Path) -> None:
    """Called when the bytes of ``target`` are in its temporary file ``written``, before it takes its name."""
    for kind, options in _faults():
        if kind == "enospc" and options.get("file", "\0") in target.name:
            if written.is_file():  # the disk filled up half-way through the file
                with open(written, "r+b") as fh:
                    fh.truncate(written.stat().st_size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(written))
