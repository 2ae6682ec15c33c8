"""The ``network`` group: which modules get LoRA adapters, their rank and scale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorasweep.config._checks import check_choice, check_range
from lorasweep.errors import UserError

TARGETS = ("kohya", "attention")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
"""Extensions of pickled checkpoints; unpickling can run arbitrary code, so lorasweep never loads them."""


@dataclass
class NetworkConfig:
    """LoRA network shape. Mirrors kohya's ``networks.lora`` (``--network_dim``/``--network_alpha``)."""

    dim: int = 8
    """LoRA rank r: the inner size of the down (r×in) and up (out×r) matrices. Not "hidden units"."""

    alpha: float | None = None
    """``network_alpha``: the update is scaled by alpha/dim, so alpha < dim shrinks the effective step.
    null means alpha = dim (scale 1; kohya's own default is 1). Saved as the per-module ``.alpha`` scalar."""

    alpha_ratio: float | None = None
    """alpha as a fraction of dim (alpha = alpha_ratio × dim, so the scale alpha/dim *is* this ratio).
    Sweeps search it instead of ``alpha`` so that the scale is searched independently of the rank.
    Give ``alpha`` or ``alpha_ratio``, not both."""

    train_unet: bool = True
    """Put LoRA on the UNet. false = kohya ``--network_train_text_encoder_only`` (seed: ``text_only``)."""

    train_text_encoder: bool = True
    """Put LoRA on the text encoder. false = kohya ``--network_train_unet_only`` (seed: ``unet_only``)."""

    target: str = "kohya"
    """Which modules: ``kohya`` = every Linear and 1×1 Conv in the UNet's transformer blocks (attn1/attn2
    q/k/v/out, ff, proj_in/proj_out) and the text encoder's self-attention and MLP, as kohya's
    ``networks.lora`` does (192 + 72 modules on SD 1.5); ``attention`` = attention projections only
    (128 + 48 on SD 1.5)."""

    dropout: float = 0.0
    """Dropout probability on each LoRA module's input (peft ``lora_dropout``), in [0, 1). kohya's
    ``--network_dropout`` is the same kind of regulariser but drops the r hidden units after ``lora_down``
    instead, so equal values are similar, not identical."""

    init_weights: str | None = None
    """Start from this LoRA file's weights (kohya ``--network_weights``; seed ``lora_model_for_resume``):
    weights only, the optimizer starts fresh. A kohya-format ``.safetensors`` file (pickled ``.ckpt``/``.pt``
    files are refused); its rank, alpha and modules must match this config."""

    def validate(self, key: str = "network") -> None:
        check_range(f"{key}.dim", self.dim, low=1, high=1024)
        if self.alpha is not None:
            check_range(f"{key}.alpha", self.alpha, low=0.0, low_inclusive=False)
        if self.alpha_ratio is not None:
            check_range(f"{key}.alpha_ratio", self.alpha_ratio, low=0.0, low_inclusive=False)
            if self.alpha is not None:
                raise UserError(f"{key}.alpha_ratio", f"and {key}.alpha are both set ({self.alpha_ratio} and "
                                f"{self.alpha}).", "Give one: alpha_ratio means alpha = alpha_ratio × dim.")
        check_choice(f"{key}.target", self.target, TARGETS)
        check_range(f"{key}.dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        if not (self.train_unet or self.train_text_encoder):
            raise UserError(f"{key}.train_unet / {key}.train_text_encoder",
                            "both are false, so nothing would be trained.",
                            "Set at least one of them to true (seed names: unet_only / text_only).")
        if self.init_weights is not None:
            self._check_init_weights(f"{key}.init_weights")

    def _check_init_weights(self, key: str) -> None:
        """Fail before the base model loads, not after minutes of setup."""
        path = Path(self.init_weights or "").expanduser()
        if not self.init_weights or not path.is_file():
            raise UserError(key, f"{self.init_weights!r} is not an existing file.",
                            "Give the path of a kohya-format LoRA .safetensors file, or null to start fresh.")
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UserError(key, f"{self.init_weights} is a pickle file; lorasweep never loads pickles "
                            "(unpickling can run arbitrary code).",
                            "Convert it to .safetensors with a tool you trust, or use the LoRA's .safetensors "
                            "release.")

    @property
    def effective_alpha(self) -> float:
        if self.alpha_ratio is not None:
            return float(self.alpha_ratio * self.dim)
        return float(self.dim if self.alpha is None else self.alpha)
