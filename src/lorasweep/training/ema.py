"""An exponential moving average of the LoRA weights, through diffusers' ``EMAModel``.

The loop updates it after optimizer steps (``training.ema.every_n_steps``, from ``start_step``) and swaps the
averaged weights in for validation, samples and saving (:meth:`LoraEma.applied`), then back, so training itself
never sees them. Its state (shadow weights and update count) goes into the training state for exact resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lorasweep.config.ema import EmaConfig


class LoraEma:
    """The average of ``params`` (the LoRA parameters, in a fixed order)."""

    def __init__(self, cfg: EmaConfig, params: list[nn.Parameter]) -> None:
        from diffusers.training_utils import EMAModel

        self.cfg = cfg
        self.params = params
        # foreach: one fused update over every LoRA tensor instead of hundreds of small kernels.
        self._ema = EMAModel(params, decay=cfg.decay, foreach=True)

    @property
    def updates(self) -> int:
        return int(self._ema.optimization_step)

    @property
    def decay(self) -> float:
        """The decay the last update used (0 before any)."""
        return float(getattr(self._ema, "cur_decay_value", None) or 0.0)

    def due(self, step: int) -> bool:
        c = self.cfg
        return step > c.start_step and (step - c.start_step) % c.every_n_steps == 0

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Fold the weights after optimizer step ``step`` into the average if an update is due; True if it was."""
        if not self.due(step):
            return False
        self._ema.step(self.params)
        return True

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block, the raw ones back afterwards (also on errors)."""
        self._ema.store(self.params)
        self._ema.copy_to(self.params)
        try:
            yield
        finally:
            self._ema.restore(self.params)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers on the CPU (``torch.load(weights_only=True)`` reads it)."""
        state = self._ema.state_dict()
        state["shadow_params"] = [p.detach().cpu().clone() for p in state["shadow_params"]]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadows = state["shadow_params"]
        shapes = [tuple(p.shape) for p in self.params]
        if [tuple(s.shape) for s in shadows] != shapes:
            raise ValueError("the saved EMA weights do not match this run's LoRA parameters")
        self._ema.load_state_dict(state)
        self._ema.shadow_params = [s.to(device=p.device, dtype=p.dtype)
                                   for s, p in zip(self._ema.shadow_params, self.params, strict=True)]
