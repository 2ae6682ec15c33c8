"""The ``resume`` node: continue a run from a saved training state."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ResumeConfig:
    """Resume from a state saved with ``output.save_state`` (``lorasweep resume RUN`` sets it)."""

    state_dir: str | None = None
    """A ``state/`` folder of a run (seed ``load_previous_save_state``; kohya ``--resume``); null = a fresh
    start."""

    force: bool = False
    """Resume although the config or the data set differ from the saved run's (what differs is printed and
    recorded in run.json as ``resume_forced``); the result is then not the uninterrupted run's. The LoRA's
    shape (``network``) and ``optimizer.name`` can never change. ``lorasweep resume RUN --force`` sets it."""

    def validate(self, key: str = "resume") -> None:
        return None
