"""The ``training.ema`` group: an exponential moving average of the LoRA weights."""

from __future__ import annotations

from dataclasses import dataclass

from lorasweep.config._checks import check_range


@dataclass
class EmaConfig:
    """EMA of the trainable LoRA weights (diffusers' ``EMAModel``; OneTrainer/SimpleTuner ``--use_ema``; kohya
    sd-scripts has none for LoRA). When enabled, the averaged weights are what validation measures, samples
    show and the saved LoRA file holds; the raw weights keep training and both are in the training state, so a
    resumed run continues the same average. It smooths the step-to-step noise of small-batch LoRA training."""

    enabled: bool = False
    """Keep the average (seed/kohya: none; OneTrainer ``ema``)."""

    decay: float = 0.999
    """The most weight the average keeps per update, in [0, 1). The n-th update uses
    min(decay, (1 + n) / (10 + n)) (diffusers' ramp), so early updates follow the weights closely: with
    0.999 the cap is reached after ≈9000 updates; a short LoRA run wants 0.99–0.995."""

    every_n_steps: int = 1
    """Update the average every this many optimizer steps (OneTrainer ``ema_update_step_interval``); each
    update counts once in the decay ramp."""

    start_step: int = 0
    """Optimizer steps before the first update; the first update copies the weights (diffusers'
    ``update_after_step``, counted here in optimizer steps)."""

    def validate(self, key: str = "training.ema") -> None:
        check_range(f"{key}.decay", self.decay, low=0.0, high=1.0, high_inclusive=False)
        check_range(f"{key}.every_n_steps", self.every_n_steps, low=1)
        check_range(f"{key}.start_step", self.start_step, low=0)
