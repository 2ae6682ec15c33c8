"""Learning-rate schedules: every step of every schedule equals its formula, written here from the
transformers/diffusers definitions (not computed by the library under test), for several lengths, warmup
ratios, cycle counts and powers; bad scheduler settings are refused naming the key."""

from __future__ import annotations

import math

import pytest
import torch

from lorasweep.config.optimizer import OptimizerConfig
from lorasweep.config.scheduler import SCHEDULERS, SchedulerConfig
from lorasweep.errors import UserError
from lorasweep.training.optim import build_lr_scheduler, build_optimizer, warmup_steps

BASE_LR = 2e-3  # optimizer.lr: the UNet group's lr, and the lr the polynomial schedule decays from
TE_LR = 5e-3  # optimizer.text_encoder_lr: a group with its own lr gets the same factor
LR_END = 1e-7  # diffusers' polynomial lr_end

# (total steps, warmup_ratio, num_cycles, power, warmup steps by the rule ceil(ratio × total) ≤ total - 1)
COMBOS = [
    (10, 0.0, 1, 1.0, 0),
    (10, 0.3, 2, 1.0, 3),  # 0.3 × 10 is 3.0000000000000004 in floats: still 3 steps
    (37, 0.1, 3, 2.0, 4),
    (100, 0.25, 2, 0.5, 25),
    (7, 0.5, 1, 3.0, 4),
    (5, 0.95, 2, 1.0, 4),  # ceil(4.75) = 5 would fill the run: capped at total - 1
]


def reference_factor(name: str, step: int, total: int, warmup: int, cycles: int, power: float) -> float:
    """The lr multiplier after ``step`` optimizer steps, from the schedules' definitions."""
    if name == "constant":
        return 1.0
    if step < warmup:
        return step / warmup  # linear warmup from 0
    if name == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / (total - warmup)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    if name == "cosine":  # half a cosine period, 1 → 0
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "cosine_with_restarts":  # `cycles` half cosines, each restarting at 1
        return 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    if name == "polynomial":  # from BASE_LR to LR_END, as a factor of BASE_LR
        return ((BASE_LR - LR_END) * (1.0 - progress) ** power + LR_END) / BASE_LR
    raise AssertionError(name)


def two_group_optimizer(base_lr: float = BASE_LR) -> torch.optim.Optimizer:
    unet = [torch.nn.Parameter(torch.zeros(3))]
    text_encoder = [torch.nn.Parameter(torch.zeros(3))]
    return build_optimizer(OptimizerConfig(lr=base_lr, text_encoder_lr=TE_LR), unet, text_encoder)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize(("total", "ratio", "cycles", "power", "warmup"), COMBOS)
def test_every_step_follows_the_formula(name: str, total: int, ratio: float, cycles: int, power: float,
                                        warmup: int) -> None:
    cfg = SchedulerConfig(name=name, warmup_ratio=ratio, num_cycles=cycles, power=power)
    cfg.validate()
    expected_warmup = 0 if name == "constant" else warmup
    assert warmup_steps(cfg, total) == expected_warmup
    optimizer = two_group_optimizer()
    scheduler = build_lr_scheduler(cfg, optimizer, total)
    for step in range(total + 1):
        factor = reference_factor(name, step, total, expected_warmup, cycles, power)
        unet_lr, te_lr = (group["lr"] for group in optimizer.param_groups)
        assert unet_lr == pytest.approx(BASE_LR * factor, rel=1e-9, abs=1e-18), (name, step)
        assert te_lr == pytest.approx(TE_LR * factor, rel=1e-9, abs=1e-18), (name, step)
        optimizer.step()
        scheduler.step()


def test_warmup_starts_at_zero_and_reaches_the_full_lr() -> None:
    optimizer = two_group_optimizer()
    scheduler = build_lr_scheduler(SchedulerConfig(name="linear", warmup_ratio=0.2), optimizer, 10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == 0.0  # the first optimizer step of a warmup does not move the weights
    assert seen[2] == pytest.approx(BASE_LR)  # after ceil(0.2 × 10) = 2 steps
    assert seen[3] < BASE_LR


def test_constant_ignores_warmup_ratio() -> None:
    """kohya and diffusers give ``constant`` no warmup; lorasweep keeps that (and reports 0 warmup steps)
    rather than refusing, so search spaces that mix schedules with one warmup_ratio stay valid."""
    cfg = SchedulerConfig(name="constant", warmup_ratio=0.2)
    cfg.validate()
    assert warmup_steps(cfg, 50) == 0
    optimizer = two_group_optimizer()
    scheduler = build_lr_scheduler(cfg, optimizer, 50)
    lrs = []
    for _ in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [BASE_LR] * 50
    warm = SchedulerConfig(name="constant_with_warmup", warmup_ratio=0.2)
    assert warmup_steps(warm, 50) == 10


def test_polynomial_ends_at_lr_end_of_the_base_lr() -> None:
    optimizer = two_group_optimizer()
    scheduler = build_lr_scheduler(SchedulerConfig(name="polynomial", power=2.0), optimizer, 20)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    unet_lr, te_lr = (group["lr"] for group in optimizer.param_groups)
    assert unet_lr == pytest.approx(LR_END)
    assert te_lr == pytest.approx(TE_LR * LR_END / BASE_LR)


def test_polynomial_refuses_an_lr_at_or_below_its_end() -> None:
    optimizer = two_group_optimizer(base_lr=1e-7)
    with pytest.raises(UserError, match=r"polynomial schedule decays to 1e-07") as info:
        build_lr_scheduler(SchedulerConfig(name="polynomial"), optimizer, 20)
    assert info.value.where == "optimizer.lr"


def test_unknown_scheduler_lists_the_options() -> None:
    with pytest.raises(UserError) as info:
        SchedulerConfig(name="step").validate()
    assert info.value.where == "scheduler.name"
    assert all(name in info.value.problem for name in SCHEDULERS)


@pytest.mark.parametrize(("field", "value"), [("warmup_ratio", 1.0), ("warmup_ratio", 1.5),
                                              ("warmup_ratio", -0.1), ("num_cycles", 0), ("power", 0.0),
                                              ("power", -1.0)])
def test_bad_values_are_refused_naming_the_key(field: str, value: float) -> None:
    with pytest.raises(UserError, match="out of range") as info:
        SchedulerConfig(name="cosine_with_restarts", **{field: value}).validate()
    assert info.value.where == f"scheduler.{field}"
