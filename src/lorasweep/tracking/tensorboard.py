"""TensorBoard event files beside MLflow (``tracking.tensorboard_dir``; kohya ``--logging_dir``).

tensorboardX writes the event format without TensorFlow or the TensorBoard server, so the dependency stays
small; view the files with any TensorBoard.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TensorBoardLog:
    """Scalars of one run under ``<root>/<run name>/`` (one sub-folder per run, as TensorBoard expects)."""

    def __init__(self, root: Path, run_name: str) -> None:
        from tensorboardX import SummaryWriter

        self.path = root / run_name
        self._writer: Any = SummaryWriter(logdir=str(self.path))

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
