"""The ``data`` group: where training images and captions come from and how they are prepared."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorasweep.config._checks import check_range
from lorasweep.errors import UserError


@dataclass
class BucketConfig:
    """kohya's aspect-ratio buckets: sides are multiples of ``step`` between ``min_side`` and ``max_side``
    with an area of about ``resolution²``; each image goes to the bucket closest to its aspect ratio."""

    enabled: bool = True
    """Group images into buckets of similar aspect ratio instead of square crops (seed: ``buckets``)."""

    min_side: int = 32
    """Smallest side of any bucket in pixels (kohya ``--min_bucket_reso``; 256 at 512 px)."""

    max_side: int = 128
    """Largest side of any bucket in pixels (kohya ``--max_bucket_reso``; 1024 at 512 px)."""

    step: int = 16
    """Bucket sides are multiples of this many pixels; must be a multiple of 8 (kohya
    ``--bucket_reso_steps``; 64 at 512 px)."""

    no_upscale: bool = False
    """Never upscale an image to fit a bucket: a small image gets a bucket of its own size (rounded down
    to ``step``) instead."""


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

    reg_dir: str | None = None
    """Regularisation (class) image root in the same ``<repeats>_<class>`` layout, for DreamBooth-style prior
    preservation; their loss is weighted by ``training.prior_loss_weight``. kohya: ``--reg_data_dir``."""

    shuffle_caption: bool = False
    """Shuffle the comma-separated tags of a caption every time it is used (the first ``keep_tokens`` stay
    in place). Seed name ``shuffle_captions``."""

    keep_tokens: int = 0
    """The first N comma-separated tags (the trigger word) are never shuffled or dropped."""

    caption_dropout_rate: float = 0.0
    """Probability that a sample's whole caption is replaced by the empty caption (trains the
    unconditional branch classifier-free guidance uses)."""

    caption_dropout_every_n_epochs: int | None = None
    """Every N-th epoch (N, 2N, ...), all captions of that epoch are dropped; null = never."""

    caption_tag_dropout_rate: float = 0.0
    """Probability that each tag is dropped (the first ``keep_tokens`` never are)."""

    tag_frequency_file: bool = True
    """Write ``tag_frequency.txt`` (how many images carry each tag, per concept folder) into the run folder;
    the counts are stored as ``ss_tag_frequency`` metadata either way. Seed: ``tag_occurrence_txt_file``."""

    tag_frequency_sort: str = "count"
    """Order of that file: ``count`` (most frequent first, ties alphabetical) or ``alpha``."""

    buckets: BucketConfig = field(default_factory=BucketConfig)
    """Aspect-ratio bucketing (kohya ``--enable_bucket``)."""

    color_aug: bool = False
    """Random hue/colour jitter each time an image is used (needs ``cache_latents=false``)."""

    flip_aug: bool = False
    """Random horizontal flip (cacheable: both orientations are encoded)."""

    random_crop: bool = False
    """Random instead of centre crop when an image is fitted to its bucket (needs ``cache_latents=false``)."""

    num_workers: int = 0
    """DataLoader worker processes (kohya ``--max_data_loader_n_workers``); 0 = load in the main process."""

    persistent_workers: bool = False
    """Keep the DataLoader workers alive between epochs (only with ``num_workers`` > 0)."""

    def validate(self, key: str = "data") -> None:
        check_range(f"{key}.resolution", self.resolution, low=8, high=4096)
        if self.resolution % 8:
            raise UserError(f"{key}.resolution", f"{self.resolution} is not a multiple of 8.",
                            "The VAE downsamples by 8; use e.g. 64, 512 or 768.")
        if not self.caption_extension.startswith("."):
            raise UserError(f"{key}.caption_extension", f"{self.caption_extension!r} must start with a dot.",
                            "Use e.g. `.txt` or `.caption`.")
