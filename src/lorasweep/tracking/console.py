"""The terminal side of a run: a rich progress bar (steps, loss, it/s, ETA) and the closing summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """A progress bar that is a no-op-friendly context manager; ``update`` is cheap (called at log steps)."""

    def __init__(self, console: Console, description: str, *, enabled: bool = True) -> None:
        """``enabled=False`` for sweep trials: parallel jobs sharing a terminal would garble each other's bars
        (the sweep prints one line per finished trial instead)."""
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
            disable=not enabled or (not console.is_terminal and not _force_progress()))
        self._task = self._progress.add_task(description, total=None, loss="-", rate="-")

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, step: int, total: int, loss: float | None) -> None:
        task = self._progress.tasks[0]
        rate = f"{task.speed:.2f}" if task.speed else "-"
        self._progress.update(self._task, completed=step, total=total,
                              loss="-" if loss is None else f"{loss:.4f}", rate=rate)


def _force_progress() -> bool:
    import os

    return os.environ.get("LORASWEEP_PROGRESS", "") == "1"


def make_console() -> Console:
    return Console(stderr=True)


def attach_log_handlers(log_file: Path, console: Console) -> list[logging.Handler]:
    """Log lorasweep's messages to the run's ``train.log`` and (warnings and up) to the terminal."""
    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.INFO)
    term_handler = RichHandler(console=console, show_path=False, show_time=False, level=logging.WARNING)
    logger = logging.getLogger("lorasweep")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Hydra puts an INFO console handler on the root logger; ours decide alone
    for handler in (file_handler, term_handler):
        logger.addHandler(handler)
    return [file_handler, term_handler]


def detach_log_handlers(handlers: list[logging.Handler]) -> None:
    logger = logging.getLogger("lorasweep")
    for handler in handlers:
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True


def print_summary(run_dir: Path, val_start: float, val_end: float, lora: Path, uri: str | None) -> None:
    out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    out.print(f"Run folder: {run_dir}")
    out.print(f"LoRA:       {lora}")
    out.print(f"Validation loss: {val_end:.6f} (start {val_start:.6f})")
    if uri:
        out.print(f"MLflow:     {uri}  — open the UI with: lorasweep ui")
