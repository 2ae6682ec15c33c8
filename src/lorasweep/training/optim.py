"""Optimizer with per-component learning rates, and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from lorasweep.config.network import check_loraplus_optimizer
from lorasweep.config.optimizer import OptimizerConfig
from lorasweep.config.scheduler import POLYNOMIAL_LR_END, SchedulerConfig
from lorasweep.errors import UserError


def build_optimizer(cfg: OptimizerConfig, unet_params: list[torch.nn.Parameter],
                    text_encoder_params: list[torch.nn.Parameter], *,
                    loraplus: Mapping[str, tuple[Sequence[torch.nn.Parameter], float]] | None = None,
                    ) -> torch.optim.Optimizer:
    """One param group per trained component, so ``unet_lr``/``text_encoder_lr`` differ as in kohya.

    Group order is fixed (UNet first): logged LRs and saved optimizer states depend on it. The optimizer's
    default lr is ``cfg.lr``, which the polynomial schedule reads as its starting lr.

    ``loraplus`` (:meth:`LoraNetwork.loraplus`, LoRA+): per component (``unet``/``text_encoder``) the up
    matrices and a ratio; those parameters move to a group of their own right after their component's,
    ``unet_plus``/``text_encoder_plus``, with lr × ratio, as kohya's ``prepare_optimizer_params`` does. The
    schedule multiplies every group's lr by the same factor, so the ratio holds throughout. Without it the
    groups are exactly as before.
    """
    plus = dict(loraplus or {})
    unknown = set(plus) - {"unet", "text_encoder"}
    if unknown:
        raise ValueError(f"loraplus components must be unet/text_encoder, got {sorted(unknown)}")
    if plus:
        check_loraplus_optimizer("network.loraplus_lr_ratio", cfg.name)
    groups = []
    for name, params, lr in (("unet", unet_params, cfg.unet_learning_rate),
                             ("text_encoder", text_encoder_params, cfg.text_encoder_learning_rate)):
        if not params:
            continue
        if name not in plus:
            groups.append({"params": params, "lr": lr, "name": name})
            continue
        ups, ratio = plus[name]
        up_ids = {id(p) for p in ups}
        if not up_ids <= {id(p) for p in params}:
            raise ValueError(f"LoRA+ {name} parameters are not among the {name} parameters")
        groups.append({"params": [p for p in params if id(p) not in up_ids], "lr": lr, "name": name})
        groups.append({"params": [p for p in params if id(p) in up_ids], "lr": lr * ratio, "name": f"{name}_plus"})
    if not groups:
        raise ValueError("build_optimizer needs at least one trained parameter")
    device = groups[0]["params"][0].device.type
    cfg.check_with(device=device, train_unet=bool(unet_params), train_text_encoder=bool(text_encoder_params))
    kwargs = cfg.constructor_kwargs()
    if cfg.name == "adamw" and "fused" not in kwargs and "foreach" not in kwargs:
        # fused (one kernel for all tensors) is fastest but needs every param on CUDA; foreach elsewhere.
        kwargs["fused" if device == "cuda" else "foreach"] = True
    cls = cfg.optimizer_class()
    try:
        return cls(groups, lr=cfg.lr, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise UserError("optimizer.args", f"{cls.__module__}.{cls.__name__} refused its arguments "
                        f"({_format_kwargs(kwargs)}): {exc}", "Fix or remove the offending `optimizer.args` "
                        "entry.") from None


def optimizer_description(cfg: OptimizerConfig) -> str:
    """kohya's ``ss_optimizer`` metadata: the class's module and name, then the arguments besides the
    parameters and lr, e.g. ``torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999),eps=1e-08)``."""
    cls = cfg.optimizer_class()
    kwargs = cfg.constructor_kwargs()
    return f"{cls.__module__}.{cls.__name__}" + (f"({_format_kwargs(kwargs)})" if kwargs else "")


def effective_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The lr each group actually steps with, by group name: the scheduled lr, times Prodigy's estimated
    step size ``d`` for Prodigy (kohya logs the same product as ``lr/d*lr``). With LoRA+ the up matrices'
    groups appear as ``unet_plus``/``text_encoder_plus`` (kohya: ``lr/unet plus``), at ratio × their
    component's lr."""
    out = {}
    for i, group in enumerate(optimizer.param_groups):
        lr = float(group["lr"])
        if "d" in group and "d_coef" in group:  # Prodigy
            lr *= float(group["d"])
        out[str(group.get("name", i))] = lr
    return out


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    """LETS' ``warmup_lr_ratio``: warmup = ceil(ratio × total optimizer steps), so any ratio > 0 warms up for
    at least one step, but at most total - 1 (diffusers' polynomial schedule divides by total - warmup, and a
    warmup filling the run never reaches the lr). 0 for ``constant``, which has no warmup."""
    if cfg.name == "constant":
        return 0
    # Rounded first so that float noise (0.3 × 10 = 3.0000000000000004) does not add a step.
    return min(math.ceil(round(cfg.warmup_ratio * total_steps, 6)), max(total_steps - 1, 0))


def build_lr_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer,
                       total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``get_scheduler``, the same functions kohya and the diffusers examples use (formulas in
    :mod:`lorasweep.config.scheduler`)."""
    from diffusers.optimization import get_scheduler

    if cfg.name == "polynomial" and not optimizer.defaults["lr"] > POLYNOMIAL_LR_END:
        raise UserError("optimizer.lr", f"is {optimizer.defaults['lr']:g}, but the polynomial schedule decays to "
                        f"{POLYNOMIAL_LR_END:g} and needs a larger starting lr.",
                        "Raise `optimizer.lr`, or choose another `scheduler`.")
    return get_scheduler(cfg.name, optimizer=optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps, num_cycles=cfg.num_cycles, power=cfg.power)


def _format_kwargs(kwargs: dict[str, object]) -> str:
    return ",".join(f"{name}={value}" for name, value in kwargs.items())
