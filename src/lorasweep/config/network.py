"""The ``network`` group: which modules get LoRA adapters, their rank and scale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorasweep.config._checks import check_choice, check_range
from lorasweep.errors import UserError

TARGETS = ("kohya", "attention")
ALGOS = ("lora", "loha", "lokr")
"""``network.algo`` values, LyCORIS's ``algo`` names."""
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
"""Extensions of pickled checkpoints; unpickling can run arbitrary code, so lorasweep never loads them."""


def check_loraplus_optimizer(where: str, optimizer: str) -> None:
    """LoRA+ needs per-group learning rates, which Prodigy refuses (kohya does not support the pair either)."""
    if optimizer == "prodigy":
        raise UserError(where, "LoRA+ gives the up matrices their own learning rate, but Prodigy estimates one "
                        "step size for all parameters and refuses different group lrs.",
                        "Leave the loraplus ratios null with optimizer=prodigy, or choose another optimizer.")


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

    algo: str = "lora"
    """The adapter (LyCORIS ``algo``). ``lora``: ΔW = up·down, rank ``dim`` (kohya ``networks.lora``; with
    ``conv_dim`` this is LoCon, kohya's "C3Lier"). ``loha``: ΔW = (w1a·w1b) ⊙ (w2a·w2b), the element-wise
    product of two rank-``dim`` products, so rank up to dim² for twice LoRA's parameters. ``lokr``: ΔW =
    w1 ⊗ w2, a Kronecker product of a small full matrix and a (rank-``dim``) larger one (``lokr_factor``).
    Built with peft's LoraConfig / LoHaConfig / LoKrConfig and saved in the LyCORIS keys A1111, ComfyUI and
    kohya (``--network_module lycoris.kohya``) load; diffusers' ``load_lora_weights`` reads ``lora`` only
    (with or without ``conv_dim``)."""

    dora: bool = False
    """DoRA, weight-decomposed LoRA (LyCORIS ``dora_wd``, peft ``use_dora``): every adapted weight becomes
    m · (W + ΔW) / ‖W + ΔW‖ per output channel, with the magnitude m trained too (it starts at ‖W‖, so the
    untrained network is still the base). Saved as ``<module>.dora_scale`` shaped [out, 1] ([out, 1, 1, 1]
    for convs), LyCORIS's ``wd_on_output=True`` layout (``lycoris.kohya`` loads it; ComfyUI reads it;
    A1111 reads only LyCORIS's older per-input-channel layout; diffusers drops ``dora_scale`` for SD 1.x).
    ``algo=lora`` only: peft has no DoRA for LoHa/LoKr. Slower per step: the weight norm is recomputed in
    every forward."""

    conv_dim: int | None = None
    """LoCon: also adapt the UNet's ResNet blocks and down/upsamplers, as kohya's ``conv_dim`` network
    argument does: their 3×3 convolutions get rank ``conv_dim``; their Linear (``time_emb_proj``) and 1×1
    ``conv_shortcut`` get ``dim``/``alpha``. 278 UNet modules on SD 1.5 instead of 192. null = off (LyCORIS
    defaults it to ``dim``; kohya to off). Works with every ``algo``."""

    conv_alpha: float | None = None
    """Alpha of the 3×3 convolutions (kohya/LyCORIS ``conv_alpha``): their update is scaled by
    conv_alpha/conv_dim. null = the same scale as the other modules (conv_dim × alpha/dim); kohya's own
    default is 1. Ignored while ``conv_dim`` is null."""

    rank_dropout: float = 0.0
    """Probability of dropping each rank (kohya/LyCORIS ``rank_dropout``), in [0, 1), while training only.
    ``lora``: as kohya, each of the r hidden units after ``lora_down`` is zeroed per sample and the update
    rescaled by 1/(1-p). ``loha``/``lokr``: as LyCORIS (peft), whole output rows of ΔW are dropped per step
    (LoHa rescales by the kept share, LoKr does not). Draws from torch's global random stream, like
    ``dropout``, so runs stay reproducible and resumable and gradient checkpointing sees the same masks."""

    module_dropout: float = 0.0
    """Probability of skipping a module's whole adapter for one forward pass (kohya/LyCORIS
    ``module_dropout``), in [0, 1), while training only: that module then acts as the base layer."""

    lokr_factor: int = -1
    """LoKr's Kronecker split (LyCORIS ``factor``): each size n is split into n = a × b with a ≤ factor
    (-1: the split closest to √n). w1 is [a_out, a_in] and full, w2 [b_out, b_in] is full when
    dim ≥ max(b_out, b_in)/2, else a rank-``dim`` product. As in LyCORIS, a module whose w1 and w2 are both
    full has no low-rank part and ignores alpha (scale 1). Ignored unless ``algo=lokr``."""

    loraplus_lr_ratio: float | None = None
    """LoRA+ (kohya/LyCORIS ``loraplus_lr_ratio``): the up matrices (``lora_up``, peft lora_B) train with
    learning rate × this ratio (the paper suggests 16), the down matrices with the plain rate. null = off.
    ``algo=lora`` only (LoHa/LoKr have no up matrix); not with Prodigy, which refuses per-group lrs."""

    loraplus_unet_lr_ratio: float | None = None
    """LoRA+ ratio for the UNet only (kohya ``loraplus_unet_lr_ratio``); null = ``loraplus_lr_ratio``."""

    loraplus_text_encoder_lr_ratio: float | None = None
    """LoRA+ ratio for the text encoder only (kohya ``loraplus_text_encoder_lr_ratio``); null =
    ``loraplus_lr_ratio``."""

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
        self._check_variant(key)
        if not (self.train_unet or self.train_text_encoder):
            raise UserError(f"{key}.train_unet / {key}.train_text_encoder",
                            "both are false, so nothing would be trained.",
                            "Set at least one of them to true (seed names: unet_only / text_only).")
        if self.init_weights is not None:
            self._check_init_weights(f"{key}.init_weights")

    def _check_variant(self, key: str) -> None:
        """Ranges of the variant keys, then the combinations peft (or the method) cannot build."""
        check_choice(f"{key}.algo", self.algo, ALGOS)
        if self.conv_dim is not None:
            check_range(f"{key}.conv_dim", self.conv_dim, low=1, high=1024)
        if self.conv_alpha is not None:
            check_range(f"{key}.conv_alpha", self.conv_alpha, low=0.0, low_inclusive=False)
        for name in ("rank_dropout", "module_dropout"):
            check_range(f"{key}.{name}", getattr(self, name), low=0.0, high=1.0, high_inclusive=False)
        if self.lokr_factor != -1 and self.lokr_factor < 1:
            raise UserError(f"{key}.lokr_factor", f"is {self.lokr_factor}; it must be -1 (the most balanced "
                            "split) or a positive size limit.", f"Set `{key}.lokr_factor=-1` or e.g. 8.")
        for name in LORAPLUS_KEYS:
            value = getattr(self, name)
            if value is not None:
                check_range(f"{key}.{name}", value, low=0.0, low_inclusive=False)
        if self.algo == "lora":
            if self.dora and self.rank_dropout:
                raise UserError(f"{key}.dora / {key}.rank_dropout", f"are both set (true and {self.rank_dropout}), "
                                "but peft's DoRA measures the weight norm by passing an identity batch through "
                                "lora_down, which per-sample rank dropout would corrupt.",
                                f"Use `{key}.module_dropout` or `{key}.dropout` with DoRA, or set "
                                f"`{key}.rank_dropout=0`.")
            return
        name = "LoHa" if self.algo == "loha" else "LoKr"
        if self.dora:
            raise UserError(f"{key}.dora / {key}.algo", f"DoRA is on with algo={self.algo}, but peft builds DoRA "
                            f"for LoRA only, not for {name}.",
                            f"Set `{key}.algo=lora` to train DoRA, or `{key}.dora=false` to train {name}.")
        if self.dropout:
            raise UserError(f"{key}.dropout / {key}.algo", f"dropout is {self.dropout} with algo={self.algo}, but "
                            f"{name} has no input dropout (peft's {name} layers have none; LyCORIS ignores it).",
                            f"Use `{key}.rank_dropout` or `{key}.module_dropout` with {name}, or set "
                            f"`{key}.dropout=0`.")
        plus = [f"{key}.{n}" for n in LORAPLUS_KEYS if getattr(self, n) is not None]
        if plus:
            raise UserError(" / ".join(plus), f"LoRA+ is set with algo={self.algo}, but LoRA+ raises the learning "
                            f"rate of LoRA's up matrices and {name} has none (LyCORIS ignores it there).",
                            f"Set `{key}.algo=lora`, or leave the loraplus ratios null.")

    def check_with(self, *, optimizer: str, key: str = "network") -> None:
        """Checks that need another group: ``optimizer`` is ``optimizer.name``."""
        plus = [f"{key}.{n}" for n in LORAPLUS_KEYS if getattr(self, n) is not None]
        if plus:
            check_loraplus_optimizer(" / ".join(plus), optimizer)

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
    def effective_conv_alpha(self) -> float | None:
        """The 3×3 convolutions' alpha (None without ``conv_dim``): ``conv_alpha``, or the scale of the others."""
        if self.conv_dim is None:
            return None
        if self.conv_alpha is not None:
            return float(self.conv_alpha)
        return float(self.conv_dim * self.effective_alpha / self.dim)

    @property
    def loraplus_ratios(self) -> tuple[float | None, float | None]:
        """(UNet, text encoder) LoRA+ ratios; the specific one wins, as kohya's ``ratio or loraplus_lr_ratio``."""
        unet = self.loraplus_unet_lr_ratio if self.loraplus_unet_lr_ratio is not None else self.loraplus_lr_ratio
        te = (self.loraplus_text_encoder_lr_ratio if self.loraplus_text_encoder_lr_ratio is not None
              else self.loraplus_lr_ratio)
        return unet, te

    @property
    def effective_alpha(self) -> float:
        if self.alpha_ratio is not None:
            return float(self.alpha_ratio * self.dim)
        return float(self.dim if self.alpha is None else self.alpha)
