"""The ``output`` group: where the run folder goes and how the LoRA file is named."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorasweep.config._checks import check_choice, check_range
from lorasweep.errors import UserError

FORMATS = ("safetensors", "ckpt", "pt")
"""LoRA file formats, kohya ``--save_model_as`` (its ``diffusers`` formats are full models, not LoRAs)."""


@dataclass
class OutputConfig:
    """Run folder and LoRA file. kohya: ``--output_name``, ``--training_comment``, ``--no_metadata``."""

    root: str = "outputs"
    """Root of ``runs/``, ``mlflow.db`` and ``mlartifacts/``. Relative paths are taken from the directory
    lorasweep is started in."""

    name: str = "lora"
    """File name of the saved LoRA without extension (``output.format`` adds it), seed name
    ``change_output_name``."""

    run_name: str = "train"
    """Suffix of the run folder name ``<date>_<time>_<run_name>``."""

    comment: str | None = None
    """Free text stored in the LoRA metadata as ``ss_training_comment`` (kohya ``--training_comment``)."""

    no_metadata: bool = False
    """Save the LoRA without any ``ss_*`` training metadata (kohya ``--no_metadata``; kohya still keeps six
    ``ss_*`` keys naming the network, lorasweep keeps none). The ``sshs_*`` content hashes stay, as in
    kohya: they describe the tensors, not the training."""

    format: str = "safetensors"
    """File format of the saved LoRA, which is also its extension: ``safetensors``, or the pickle formats
    ``ckpt``/``pt`` (a ``torch.save`` of the same kohya state dict, for old tools; written only on request,
    carry no metadata at all, as in kohya, and lorasweep never loads them). Seed: ``save_as``; kohya
    ``--save_model_as``."""

    export_dir: str | None = None
    """Also copy the final LoRA (and snapshots) here; the run folder keeps its own copy. Seed:
    ``output_folder``; kohya ``--output_dir``."""

    save_every_n_epochs: int | None = None
    """Save a numbered snapshot ``<name>-000001`` every N epochs (and the training state with
    ``save_state``); null = only the final file."""

    save_every_n_steps: int | None = None
    """Also save a snapshot ``<name>-step00000100`` every N optimizer steps (and the training state with
    ``save_state``, so a crash loses at most N steps); null = none. kohya ``--save_every_n_steps``."""

    save_state: bool = False
    """With each save, also save the training state (LoRA, optimizer, scheduler, grad scaler, RNGs, data
    position) under ``state/`` for an exact resume. The frozen base is never stored."""

    def validate(self, key: str = "output") -> None:
        for sub in ("name", "run_name"):
            value = getattr(self, sub)
            if not value or not re.fullmatch(r"[\w.\-]+", value):
                raise UserError(f"{key}.{sub}", f"{value!r} is not a usable file name.",
                                "Use letters, digits, '.', '_' and '-' only.")
        check_choice(f"{key}.format", self.format, FORMATS)
        suffix = self.name.rpartition(".")[2].lower() if "." in self.name else ""
        if suffix in (*FORMATS, "pth", "bin"):
            raise UserError(f"{key}.name", f"{self.name!r} ends in a file extension; output.format adds it.",
                            f"Use `{key}.name={self.name.rpartition('.')[0]}` and `{key}.format=<format>`.")
        for sub in ("save_every_n_epochs", "save_every_n_steps"):
            if getattr(self, sub) is not None:
                check_range(f"{key}.{sub}", getattr(self, sub), low=1)
