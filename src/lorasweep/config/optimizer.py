"""The ``optimizer`` group: optimizer type, its arguments and the per-component learning rates.

Which shared keys reach which constructor (the others are not arguments of that optimizer and are ignored):

- ``adamw`` (``torch.optim.AdamW``), ``adamw8bit`` (``bitsandbytes.optim.AdamW8bit``) and ``prodigy``
  (``prodigyopt.Prodigy``): beta1 and beta2 (as ``betas``), eps, weight_decay;
- ``lion`` (``lion_pytorch.Lion``): beta1 and beta2 (as ``betas``), weight_decay;
- ``adafactor`` (``transformers.optimization.Adafactor``): weight_decay.

Everything else a constructor takes goes in ``optimizer.args`` (kohya's ``--optimizer_args``).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorasweep.config._checks import check_choice, check_range
from lorasweep.errors import UserError

PRODIGY_MIN_LR = 0.1
"""Below this Prodigy's ``lr`` (a multiplier of its own step-size estimate) is almost surely an AdamW learning
rate carried over by mistake; kohya warns at the same bound."""

BNB_CPU_VERSION = (0, 50)
"""First bitsandbytes release whose CPU backend steps the 8-bit optimizers (measured: 0.49.2 raises "All input
tensors need to be on the same GPU" on CPU tensors, 0.50.0 and 0.50.2 step them)."""


@dataclass(frozen=True)
class OptimizerSpec:
    """How lorasweep builds one ``optimizer.name``."""

    module: str
    """Module the class is imported from."""
    cls: str
    """Class name."""
    package: str
    """Top-level import name, checked with ``find_spec`` (cheap: nothing is imported)."""
    install: str
    """What to install when it is missing."""
    shared: tuple[str, ...]
    """Which of ``beta1``, ``beta2``, ``eps``, ``weight_decay`` this constructor takes."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """lorasweep's defaults for constructor arguments, under ``optimizer.args`` (written to ``ss_optimizer``)."""


OPTIMIZER_SPECS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim", "AdamW", "torch", "torch", ("beta1", "beta2", "eps", "weight_decay")),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim", "AdamW8bit", "bitsandbytes",
                               '`pip install "lorasweep[bnb]"` (or `pip install bitsandbytes`)',
                               ("beta1", "beta2", "eps", "weight_decay")),
    "prodigy": OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt",
                             '`pip install "lorasweep[prodigy]"` (or `pip install prodigyopt`)',
                             ("beta1", "beta2", "eps", "weight_decay")),
    "adafactor": OptimizerSpec("transformers.optimization", "Adafactor", "transformers", "`pip install transformers`",
                               ("weight_decay",),
                               # transformers' defaults (True, True, False) let Adafactor pick its own lr and
                               # ignore optimizer.lr; these are kohya users' "fixed lr" Adafactor arguments.
                               {"scale_parameter": False, "relative_step": False, "warmup_init": False}),
    "lion": OptimizerSpec("lion_pytorch", "Lion", "lion_pytorch",
                          '`pip install "lorasweep[lion]"` (or `pip install lion-pytorch`)',
                          ("beta1", "beta2", "weight_decay")),
}
OPTIMIZERS = tuple(OPTIMIZER_SPECS)

_SHARED_ARG = {"beta1": "betas", "beta2": "betas", "eps": "eps", "weight_decay": "weight_decay"}
"""Constructor argument each shared key becomes."""


@dataclass
class OptimizerConfig:
    """Optimizer. kohya: ``--optimizer_type``, ``--optimizer_args``, ``--learning_rate``, ``--unet_lr``,
    ``--text_encoder_lr``. Presets: ``optimizer=adamw|adamw8bit|prodigy|adafactor|lion``."""

    name: str = "adamw"
    """``adamw`` (torch AdamW), ``adamw8bit`` (bitsandbytes AdamW8bit: 8-bit optimizer states; LETS
    ``use_8bit_adam``; extra ``bnb``), ``prodigy`` (prodigyopt Prodigy, which estimates its own step size: set
    ``lr`` near 1.0; extra ``prodigy``), ``adafactor`` (transformers Adafactor with a fixed lr) or ``lion``
    (lion-pytorch Lion: sign updates, so use a 3-10x smaller lr and larger weight decay than AdamW; extra
    ``lion``). ``pip install "lorasweep[optimizers]"`` installs every extra package."""

    lr: float = 1e-3
    """Base learning rate for every trained parameter group. For ``prodigy`` it multiplies the step size
    Prodigy estimates (d), so 1.0 means "as estimated" and values below 0.1 are refused."""

    unet_lr: float | None = None
    """Learning rate of the UNet LoRA modules; null = ``lr``. Prodigy needs one lr for all trained groups."""

    text_encoder_lr: float | None = None
    """Learning rate of the text-encoder LoRA modules; null = ``lr``. Prodigy needs one lr for all trained
    groups."""

    weight_decay: float = 0.01
    """Decoupled weight decay (the parameters shrink by lr × weight_decay per step). Used by every optimizer."""

    beta1: float = 0.9
    """First-moment (momentum) decay. adamw, adamw8bit, prodigy, lion; not adafactor, whose own optional
    ``beta1`` goes in ``args``."""

    beta2: float = 0.999
    """Second-moment decay (lion: the momentum-update interpolation, 0.99 in its paper). adamw, adamw8bit,
    prodigy, lion; not adafactor (its ``decay_rate`` goes in ``args``)."""

    eps: float = 1e-8
    """Denominator epsilon. adamw, adamw8bit, prodigy; lion has none and adafactor's ``eps`` is a pair set in
    ``args``."""

    args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the optimizer's constructor (kohya ``--optimizer_args``), e.g.
    ``+optimizer.args.d_coef=2`` for Prodigy; unknown names are refused with the accepted list. adafactor
    defaults to ``scale_parameter``, ``relative_step`` and ``warmup_init`` false (Adafactor's own lr schedule is
    not supported: lorasweep's ``scheduler`` sets the lr)."""

    def validate(self, key: str = "optimizer") -> None:
        """Ranges, the optimizer's package (found without importing it) and ``args`` against the
        constructor's signature."""
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
        spec = self.spec
        if importlib.util.find_spec(spec.package) is None:
            raise UserError(f"{key}.name", f"{self.name} needs the {spec.package} package, which is not installed.",
                            f"Install it with {spec.install}, or choose another optimizer.")
        self._check_args(key)

    @property
    def spec(self) -> OptimizerSpec:
        return OPTIMIZER_SPECS[self.name]

    @property
    def unet_learning_rate(self) -> float:
        return self.lr if self.unet_lr is None else self.unet_lr

    @property
    def text_encoder_learning_rate(self) -> float:
        return self.lr if self.text_encoder_lr is None else self.text_encoder_lr

    def optimizer_class(self) -> type:
        """The optimizer class (imports its package)."""
        return getattr(importlib.import_module(self.spec.module), self.spec.cls)

    def constructor_kwargs(self) -> dict[str, Any]:
        """Every constructor argument but ``params`` and ``lr``, in the order ``ss_optimizer`` lists them:
        the shared keys this optimizer takes, lorasweep's defaults, then ``args`` (lists become tuples, as
        kohya's ``ast.literal_eval`` of ``betas=0.9,0.99`` gives)."""
        spec = self.spec
        kwargs: dict[str, Any] = {}
        if "weight_decay" in spec.shared:
            kwargs["weight_decay"] = self.weight_decay
        if "beta1" in spec.shared:
            kwargs["betas"] = (self.beta1, self.beta2)
        if "eps" in spec.shared:
            kwargs["eps"] = self.eps
        kwargs.update(spec.defaults)
        kwargs.update({name: tuple(value) if isinstance(value, list) else value for name, value in self.args.items()})
        return kwargs

    def _check_args(self, key: str) -> None:
        spec = self.spec
        for name in self.args:
            where = f"{key}.args.{name}"
            if name in ("params", "lr"):
                raise UserError(where, "is set by lorasweep, not through args.",
                                f"Set the learning rate with `{key}.lr` (and `{key}.unet_lr`/`{key}.text_encoder_lr`).")
            shared = [k for k in spec.shared if _SHARED_ARG[k] == name]
            if shared:
                raise UserError(where, f"is set by {' and '.join(f'`{key}.{k}`' for k in shared)} for {self.name}.",
                                f"Set {'those keys' if len(shared) > 1 else 'that key'} instead of the argument.")
        if self.name == "adafactor":
            merged = {**spec.defaults, **self.args}
            for flag in ("relative_step", "warmup_init"):
                if merged[flag]:
                    raise UserError(f"{key}.args.{flag}", "is true, so Adafactor would choose its own learning rate "
                                    f"and ignore {key}.lr and the lr scheduler; lorasweep does not support that.",
                                    f"Set `{key}.args.{flag}=false` (the adafactor preset does) and pick the lr with "
                                    f"`{key}.lr` and a `scheduler` such as constant_with_warmup.")
        if not self.args:
            return  # the shared keys are range-checked above; nothing to import
        cls = self.optimizer_class()
        params = inspect.signature(cls.__init__).parameters.values()
        accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                    and p.name not in ("self", "params", "lr") and p.name not in (_SHARED_ARG[k] for k in spec.shared)]
        via_keys = ", ".join(f"{key}.{k}" for k in spec.shared)
        for name in self.args:
            if name not in accepted:
                close = difflib.get_close_matches(name, accepted, n=1)
                raise UserError(f"{key}.args.{name}", f"is not an argument of {spec.module}.{spec.cls} "
                                f"({key}.name={self.name}).",
                                f"{f'Did you mean `{close[0]}`? ' if close else ''}Accepted: {', '.join(accepted)} "
                                f"(and, as their own keys, {via_keys}).")

    def check_with(self, *, device: str, train_unet: bool = True, train_text_encoder: bool = True,
                   key: str = "optimizer") -> None:
        """Checks that need other groups: ``device`` is ``training.device`` (``auto``, ``cpu``, ``cuda``) or a
        torch device type, the flags say which parameter groups exist. ``build_optimizer`` runs it too."""
        if self.name == "prodigy":
            lrs = {}
            if train_unet:
                lrs["unet_lr"] = self.unet_learning_rate
            if train_text_encoder:
                lrs["text_encoder_lr"] = self.text_encoder_learning_rate
            active = {k: v for k, v in lrs.items() if v != 0.0}
            for sub, value in active.items():
                if value < PRODIGY_MIN_LR:
                    where = f"{key}.{sub}" if getattr(self, sub) is not None else f"{key}.lr"
                    raise UserError(where, f"is {value:g}, but Prodigy's lr multiplies the step size it estimates "
                                    f"itself, so {value:g} trains about {1 / value:.0f}x slower than Prodigy intends.",
                                    f"Use `{key}.lr=1.0` (scale with `+{key}.args.d_coef=...`), as the prodigy preset "
                                    "does.")
            if len(set(active.values())) > 1:
                raise UserError(f"{key}.unet_lr / {key}.text_encoder_lr",
                                f"differ ({', '.join(f'{k}={v:g}' for k, v in active.items())}), but Prodigy steps "
                                "every group with one estimated step size and refuses different lrs (0 excepted).",
                                f"Leave both null so `{key}.lr` applies to both, or set them equal.")
        if self.name == "adamw8bit" and _resolve_device(device) == "cpu":
            version = bnb_version()
            if version is not None and version < BNB_CPU_VERSION:
                found = ".".join(map(str, version))
                raise UserError(f"{key}.name", f"adamw8bit trains on the CPU here, but bitsandbytes {found} steps "
                                "its 8-bit optimizers on CUDA only (CPU support came in 0.50).",
                                '`pip install -U "bitsandbytes>=0.50"`, train on a CUDA GPU, or use optimizer=adamw.')


def bnb_version() -> tuple[int, ...] | None:
    """Installed bitsandbytes version as (major, minor), or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("bitsandbytes")
    except PackageNotFoundError:
        return None
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2])


def _resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]
