"""The ``precision`` group: autocast dtype for training and dtype of the saved LoRA."""

from __future__ import annotations

from dataclasses import dataclass

from lorasweep.config._checks import check_choice

MIXED = ("no", "fp16", "bf16")
SAVE = ("float", "fp16", "bf16")


@dataclass
class PrecisionConfig:
    """kohya: ``--mixed_precision``, ``--save_precision``."""

    mixed: str = "no"
    """Autocast dtype: ``no``, ``fp16`` (with a gradient scaler; CUDA only) or ``bf16`` (CPU and CUDA)."""

    save: str = "fp16"
    """dtype of the saved LoRA tensors: ``float``, ``fp16`` or ``bf16``."""

    def validate(self, key: str = "precision") -> None:
        check_choice(f"{key}.mixed", self.mixed, MIXED)
        check_choice(f"{key}.save", self.save, SAVE)
