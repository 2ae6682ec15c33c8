"""The ``optimizer`` group: optimizer and per-component learning rates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorasweep.config._checks import check_choice, check_range

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "lion")


@dataclass
class OptimizerConfig:
    """Optimizer. kohya: ``--optimizer_type``, ``--learning_rate``, ``--unet_lr``, ``--text_encoder_lr``."""

    name: str = "adamw"
    """Optimizer type: ``adamw`` (torch AdamW)."""

    lr: float = 1e-3
    """Base learning rate for every trained parameter group."""

    unet_lr: float | None = None
    """Learning rate of the UNet LoRA modules; null = ``lr``."""

    text_encoder_lr: float | None = None
    """Learning rate of the text-encoder LoRA modules; null = ``lr``."""

    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""

    beta1: float = 0.9
    """AdamW first-moment decay."""

    beta2: float = 0.999
    """AdamW second-moment decay."""

    eps: float = 1e-8
    """AdamW epsilon."""

    args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the optimizer's constructor (kohya ``--optimizer_args``), e.g.
    ``+optimizer.args.d_coef=2`` for Prodigy."""

    def validate(self, key: str = "optimizer") -> None:
        check_choice(f"{key}.name", self.name, OPTIMIZERS)
        check_range(f"{key}.lr", self.lr, low=0.0, low_inclusive=False, high=10.0)
        for sub in ("unet_lr", "text_encoder_lr"):
            value = getattr(self, sub)
            if value is not None:
                check_range(f"{key}.{sub}", value, low=0.0, high=10.0)
        check_range(f"{key}.weight_decay", self.weight_decay, low=0.0, high=1.0)
        check_range(f"{key}.beta1", self.beta1, low=0.0, high=1.0, high_inclusive=False)
        check_range(f"{key}.beta2", self.beta2, low=0.0, high=1.0, high_inclusive=False)
        check_range(f"{key}.eps", self.eps, low=0.0, low_inclusive=False)

    @property
    def unet_learning_rate(self) -> float:
        return self.lr if self.unet_lr is None else self.unet_lr

    @property
    def text_encoder_learning_rate(self) -> float:
        return self.lr if self.text_encoder_lr is None else self.text_encoder_lr
