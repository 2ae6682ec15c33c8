"""The ``output`` group: where the run folder goes and how the LoRA file is named."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorasweep.errors import UserError


@dataclass
class OutputConfig:
    """Run folder and LoRA file. kohya: ``--output_name``, ``--training_comment``, ``--no_metadata``."""

    root: str = "outputs"
    """Root of ``runs/``, ``mlflow.db`` and ``mlartifacts/``. Relative paths are taken from the directory
    lorasweep is started in."""

    name: str = "lora"
    """File name of the saved LoRA (without extension), seed name ``change_output_name``."""

    run_name: str = "train"
    """Suffix of the run folder name ``<date>_<time>_<run_name>``."""

    comment: str | None = None
    """Free text stored in the LoRA metadata as ``ss_training_comment``."""

    no_metadata: bool = False
    """Save the LoRA without ``ss_*`` training metadata."""

    def validate(self, key: str = "output") -> None:
        for sub in ("name", "run_name"):
            value = getattr(self, sub)
            if not value or not re.fullmatch(r"[\w.\-]+", value):
                raise UserError(f"{key}.{sub}", f"{value!r} is not a usable file name.",
                                "Use letters, digits, '.', '_' and '-' only.")
