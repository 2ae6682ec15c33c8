"""The ``data`` group: where training images and captions come from and how they are prepared."""

from __future__ import annotations

from dataclasses import dataclass

from lorasweep.config._checks import check_range
from lorasweep.errors import UserError


@dataclass
class DataConfig:
    """Training data in kohya's layout: ``<train_dir>/<repeats>_<name>/<image> + <caption file>``."""

    train_dir: str | None = None
    """Image root with ``<repeats>_<concept>`` sub-folders (e.g. ``10_shiroko``): each image is seen
    ``repeats`` times per epoch. null = the built-in synthetic concept set (generated on first use)."""

    resolution: int = 64
    """Training side in pixels: images are resized (shorter side) and centre-cropped to this square.
    Must be a multiple of 8 (the VAE's factor)."""

    caption_extension: str = ".txt"
    """Extension of the caption file beside each image (``.txt``, ``.caption``)."""

    cache_latents: bool = True
    """Encode every image with the VAE once, before training, and reuse that posterior sample (the VAE is
    frozen, so this mostly saves time). false = encode each batch anew with a fresh posterior sample."""

    def validate(self, key: str = "data") -> None:
        check_range(f"{key}.resolution", self.resolution, low=8, high=4096)
        if self.resolution % 8:
            raise UserError(f"{key}.resolution", f"{self.resolution} is not a multiple of 8.",
                            "The VAE downsamples by 8; use e.g. 64, 512 or 768.")
        if not self.caption_extension.startswith("."):
            raise UserError(f"{key}.caption_extension", f"{self.caption_extension!r} must start with a dot.",
                            "Use e.g. `.txt` or `.caption`.")
