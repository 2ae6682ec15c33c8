"""The ``network`` group: which modules get LoRA adapters, their rank and scale."""

from __future__ import annotations

from dataclasses import dataclass

from lorasweep.config._checks import check_choice, check_range

TARGETS = ("kohya", "attention")


@dataclass
class NetworkConfig:
    """LoRA network shape. Mirrors kohya's ``networks.lora`` (``--network_dim``/``--network_alpha``)."""

    dim: int = 8
    """LoRA rank r: the inner size of the down (r×in) and up (out×r) matrices. Not "hidden units"."""

    alpha: float | None = None
    """``network_alpha``: the update is scaled by alpha/dim, so alpha < dim shrinks the effective step.
    null means alpha = dim (scale 1). Saved as the per-module ``.alpha`` scalar."""

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
    ``networks.lora`` does; ``attention`` = attention projections only."""

    dropout: float = 0.0
    """Dropout on the LoRA input (peft ``lora_dropout``; kohya ``--network_dropout``)."""

    init_weights: str | None = None
    """Start from this LoRA file's weights (kohya ``--network_weights``; seed ``lora_model_for_resume``):
    weights only, the optimizer starts fresh. Its rank, alpha and modules must match this config."""

    def validate(self, key: str = "network") -> None:
        check_range(f"{key}.dim", self.dim, low=1, high=1024)
        if self.alpha is not None:
            check_range(f"{key}.alpha", self.alpha, low=0.0, low_inclusive=False)
        if self.alpha_ratio is not None:
            check_range(f"{key}.alpha_ratio", self.alpha_ratio, low=0.0, low_inclusive=False)
            if self.alpha is not None:
                from lorasweep.errors import UserError

                raise UserError(f"{key}.alpha_ratio", f"and {key}.alpha are both set ({self.alpha_ratio} and "
                                f"{self.alpha}).", "Give one: alpha_ratio means alpha = alpha_ratio × dim.")
        check_choice(f"{key}.target", self.target, TARGETS)
        check_range(f"{key}.dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)

    @property
    def effective_alpha(self) -> float:
        if self.alpha_ratio is not None:
            return float(self.alpha_ratio * self.dim)
        return float(self.dim if self.alpha is None else self.alpha)
