"""The ``sampling`` group: fixed prompts × fixed seeds rendered during training."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorasweep.config._checks import check_range
from lorasweep.errors import UserError


@dataclass
class SamplingConfig:
    """Sample images, so runs can be compared by eye (MLflow image grid)."""

    enabled: bool = True
    """Render samples at step 0 (the base alone), every ``every_n_steps`` and at the end."""

    every_n_steps: int | None = 100
    """Sampling interval in optimizer steps; null = only at start and end."""

    prompts: list[str] = field(default_factory=lambda: [
        "zorb, on the left, blue background",
        "zorb, in the center, white background",
    ])
    """Prompts; the defaults use the synthetic concept's trigger word."""

    negative_prompt: str = ""
    """Negative prompt for classifier-free guidance."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """One image per prompt and seed, with a generator seeded by it (independent of training)."""

    num_inference_steps: int = 20
    """Denoising steps (DDIM)."""

    guidance_scale: float = 5.0
    """Classifier-free guidance scale."""

    def validate(self, key: str = "sampling") -> None:
        if self.every_n_steps is not None:
            check_range(f"{key}.every_n_steps", self.every_n_steps, low=1)
        if self.enabled and (not self.prompts or not self.seeds):
            raise UserError(f"{key}.prompts", "sampling is enabled but prompts or seeds is empty.",
                            "Give at least one prompt and one seed, or set `sampling.enabled=false`.")
        check_range(f"{key}.num_inference_steps", self.num_inference_steps, low=1, high=1000)
        check_range(f"{key}.guidance_scale", self.guidance_scale, low=0.0)
