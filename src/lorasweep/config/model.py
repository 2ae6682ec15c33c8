"""The ``model`` group: which base Stable Diffusion model to train on."""

from __future__ import annotations

from dataclasses import dataclass

from lorasweep.config._checks import check_range


@dataclass
class ModelConfig:
    """Base model. kohya: ``--pretrained_model_name_or_path``, ``--clip_skip``."""

    base: str = "tiny"
    """A diffusers folder, a single-file ``.safetensors`` checkpoint, a hub id (online only), or ``tiny``:
    the embedded SD-1.x-architecture model built locally from fixed seeds (no download)."""

    clip_skip: int = 1
    """Use the N-th-from-last CLIP layer's output (1 = last, 2 = penultimate, with the final layer norm
    applied as kohya does). An int, not a bool."""

    cache_dir: str | None = None
    """Where built/converted models are cached. null = ``$LORASWEEP_CACHE_DIR`` or ``~/.cache/lorasweep``.
    Does not change results, only where files live."""

    def validate(self, key: str = "model") -> None:
        check_range(f"{key}.clip_skip", self.clip_skip, low=1, high=12)
