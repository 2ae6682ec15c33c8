"""The ``precision`` group: autocast dtype for training and dtype of the saved LoRA.

Validation only: the loop hands ``mixed`` to accelerate's ``Accelerator``, which autocasts the forward pass and,
for fp16 on CUDA, adds a gradient scaler. accelerate 1.15 accepts ``mixed_precision="fp16"`` on a CPU and then
silently trains in float32 (no autocast, no scaler), so fp16 without CUDA is refused here instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasweep.config._checks import check_choice
from lorasweep.errors import UserError

MIXED = ("no", "fp16", "bf16")
SAVE = ("float", "fp16", "bf16")


@dataclass
class PrecisionConfig:
    """kohya: ``--mixed_precision``, ``--save_precision``. Presets: ``precision=fp32|bf16|fp16``."""

    mixed: str = "no"
    """Autocast dtype of training: ``no`` (float32), ``fp16`` (with a gradient scaler; CUDA only) or ``bf16``
    (CPU, and CUDA GPUs with bf16 support: Ampere and newer). LoRA weights and optimizer states stay float32.
    Quote ``"no"`` in YAML, which otherwise reads it as false."""

    save: str = "fp16"
    """dtype of the saved LoRA tensors: ``float``, ``fp16`` or ``bf16``."""

    tf32: bool = True
    """Let float32 matrix products and convolutions use TF32 tensor cores on Ampere and newer CUDA GPUs
    (diffusers' ``--allow_tf32``): several times faster, with a 10-bit mantissa in the products. No effect on
    CPU or under fp16/bf16 autocast."""

    def validate(self, key: str = "precision") -> None:
        if self.mixed in ("False", "false"):
            raise UserError(f"{key}.mixed", "is false: YAML reads an unquoted `no` as the boolean false.",
                            f'Write `mixed: "no"` in YAML (on the command line `{key}.mixed=no` works).')
        check_choice(f"{key}.mixed", self.mixed, MIXED)
        check_choice(f"{key}.save", self.save, SAVE)

    def check_device(self, device: str, key: str = "precision") -> None:
        """``mixed`` against ``training.device`` (``auto``, ``cpu`` or ``cuda``); imports torch only when
        ``mixed`` is not ``no``."""
        if self.mixed == "no":
            return
        import torch

        cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if self.mixed == "fp16" and not cuda:
            where = "training.device is cpu" if device == "cpu" else "no CUDA device is visible"
            raise UserError(f"{key}.mixed", f"fp16 autocast needs a CUDA device; {where} (accelerate would "
                            "silently train in float32).",
                            f"Use `{key}.mixed=bf16` (works on CPU) or `{key}.mixed=no`.")
        if self.mixed == "bf16" and cuda and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise UserError(f"{key}.mixed", f"bf16 is not supported by {torch.cuda.get_device_name()}.",
                            f"Use `{key}.mixed=fp16` on this GPU, or `{key}.mixed=no`.")
