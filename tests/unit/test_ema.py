"""The EMA of the LoRA weights (training.ema): diffusers' update rule, the interval and start, swapping the
average in and out, and its state for resume."""

from __future__ import annotations

import pytest
import torch

from lorasweep.config.ema import EmaConfig
from lorasweep.errors import UserError
from lorasweep.training.ema import LoraEma


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]


def _set(params: list[torch.nn.Parameter], value: float) -> None:
    with torch.no_grad():
        for p in params:
            p.fill_(value)


def test_updates_follow_the_ramped_decay() -> None:
    """The n-th update (n = 0, 1, ...) keeps min(decay, (1 + n) / (10 + n)) of the average: the first copies."""
    params = _params()
    ema = LoraEma(EmaConfig(enabled=True, decay=0.15), params)
    expected = 0.0  # the average starts at the initial weights (zeros)
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        _set(params, value)
        assert ema.update(step)
        n = step - 1
        keep = 0.0 if n == 0 else min(0.15, (1 + n) / (10 + n))
        expected = keep * expected + (1 - keep) * value
        assert ema.decay == pytest.approx(keep)
    with ema.applied():
        assert all(torch.allclose(p, torch.full_like(p, expected)) for p in params)
    assert all(torch.equal(p, torch.full_like(p, 8.0)) for p in params)  # the trained weights are back
    assert ema.updates == 4


def test_interval_and_start() -> None:
    ema = LoraEma(EmaConfig(enabled=True, every_n_steps=3, start_step=4), _params())
    assert [s for s in range(1, 15) if ema.due(s)] == [7, 10, 13]
    assert not ema.update(5) and ema.updates == 0


def test_applied_restores_the_trained_weights_after_an_error() -> None:
    params = _params()
    ema = LoraEma(EmaConfig(enabled=True), params)
    _set(params, 5.0)
    with pytest.raises(RuntimeError), ema.applied():
        assert all(torch.equal(p, torch.zeros_like(p)) for p in params)
        raise RuntimeError("sampling failed")
    assert all(torch.equal(p, torch.full_like(p, 5.0)) for p in params)


def test_state_round_trip_continues_the_same_average() -> None:
    params_a, params_b = _params(), _params()
    a = LoraEma(EmaConfig(enabled=True, decay=0.5), params_a)
    for step in (1, 2):
        _set(params_a, float(step))
        a.update(step)
    b = LoraEma(EmaConfig(enabled=True, decay=0.5), params_b)
    b.load_state_dict(a.state_dict())
    assert b.updates == 2
    for ema, params in ((a, params_a), (b, params_b)):
        _set(params, 3.0)
        ema.update(3)
    with a.applied(), b.applied():
        assert all(torch.equal(p, q) for p, q in zip(params_a, params_b, strict=True))
    with pytest.raises(ValueError, match="do not match"):
        LoraEma(EmaConfig(enabled=True), [torch.nn.Parameter(torch.zeros(5))]).load_state_dict(a.state_dict())


@pytest.mark.parametrize(("field", "value"), [("decay", 1.0), ("decay", -0.1), ("every_n_steps", 0),
                                              ("start_step", -1)])
def test_bad_values_name_the_key(field: str, value: float) -> None:
    cfg = EmaConfig(enabled=True, **{field: value})
    with pytest.raises(UserError, match=f"training.ema.{field}"):
        cfg.validate()
