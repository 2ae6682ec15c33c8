"""The ``data`` group: where training images and captions come from and how they are prepared."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorasweep.config._checks import check_choice, check_range
from lorasweep.errors import UserError

TAG_FREQUENCY_SORTS = ("count", "alpha")


@dataclass
class BucketConfig:
    """kohya's aspect-ratio buckets: sides are multiples of ``step`` between ``min_side`` and ``max_side``
    with an area of at most (and about) the training resolution's; each image goes to the bucket closest
    to its aspect ratio, is resized to cover it and cropped to it."""

    enabled: bool = True
    """Group images into buckets of similar aspect ratio instead of one fixed-size crop (seed: ``buckets``;
    kohya ``--enable_bucket``). false = every image is resized to cover ``data.resolution`` and cropped."""

    min_side: int = 32
    """Smallest side of any bucket in pixels (kohya ``--min_bucket_reso``; 256 at 512 px). Like kohya, a
    value that is not a multiple of ``step`` is rounded down to one."""

    max_side: int = 128
    """Largest side of any bucket in pixels (kohya ``--max_bucket_reso``; 1024 at 512 px). Like kohya, a
    value that is not a multiple of ``step`` is rounded up to one."""

    step: int = 16
    """Bucket sides are multiples of this many pixels; must be a multiple of 8, the VAE's factor (kohya
    ``--bucket_reso_steps``; 64 at 512 px)."""

    no_upscale: bool = False
    """Never upscale an image to fit a bucket: an image larger than the training area is shrunk to that
    area, and its bucket is its own size rounded down to ``step`` (``min_side``/``max_side`` are then
    ignored, as in kohya ``--bucket_no_upscale``)."""

    def sides(self) -> tuple[int, int]:
        """(min_side, max_side) rounded outwards to multiples of ``step``, as kohya does."""
        low = self.min_side - self.min_side % self.step
        high = self.max_side + (-self.max_side) % self.step
        return low, high

    def validate(self, key: str = "data.buckets") -> None:
        check_range(f"{key}.step", self.step, low=8)
        if self.step % 8:
            raise UserError(f"{key}.step", f"{self.step} is not a multiple of 8.",
                            "Bucket sides must be divisible by the VAE's factor 8; use e.g. 64 (or 8, 16, 32).")
        check_range(f"{key}.min_side", self.min_side, low=self.step)
        check_range(f"{key}.max_side", self.max_side, low=self.step)
        if self.min_side > self.max_side:
            raise UserError(f"{key}.min_side", f"{self.min_side} is larger than {key}.max_side={self.max_side}.",
                            f"Make {key}.min_side <= {key}.max_side, e.g. 256 and 1024 at 512 px.")


@dataclass
class DataConfig:
    """Training data in kohya's layout: ``<train_dir>/<repeats>_<name>/<image> + <caption file>``."""

    train_dir: str | None = None
    """Image root with ``<repeats>_<concept>`` sub-folders (e.g. ``10_shiroko``): each image is seen
    ``repeats`` times per epoch. null = the built-in synthetic concept set (generated on first use)."""

    resolution: Any = 64
    """Training resolution: an int ``N`` (an ``N×N`` area) or ``[width, height]``; each side a multiple of 8
    (the VAE's factor). With buckets it sets the bucket area, without them the fixed crop size (kohya
    ``--resolution``). Use :attr:`size` for ``(width, height)``."""

    caption_extension: str = ".txt"
    """Extension of the caption file beside each image (``.txt``, ``.caption``). Only its first line is
    used, as in kohya."""

    cache_latents: bool = True
    """Encode every image with the VAE once, before training, and reuse that posterior sample (the VAE is
    frozen, so this mostly saves time); with ``flip_aug`` both orientations are encoded. Refused together
    with ``color_aug`` or ``random_crop``, which change the pixels every time. false = encode each batch
    anew with a fresh posterior sample."""

    cache_to_disk: bool = True
    """Keep cached latents (and the hidden states of static captions when the text encoder is frozen) in the
    machine-wide feature cache (``<cache root>/features``, see ``lorasweep cache info``), keyed by model,
    image bytes, bucket and flip: later runs and sweep trials on the same data encode nothing. false =
    encode for this run only, in memory (kohya's ``cache_latents`` without ``cache_latents_to_disk``)."""

    reg_dir: str | None = None
    """Regularisation (class) image root in the same ``<repeats>_<class>`` layout, for DreamBooth-style prior
    preservation; their loss is weighted by ``training.prior_loss_weight``. As in kohya, an epoch shows as
    many reg images (with repeats) as train images: surplus reg images are never used, too few get extra
    repeats. kohya: ``--reg_data_dir``."""

    shuffle_caption: bool = False
    """Shuffle the comma-separated tags of a caption every time it is used (the first ``keep_tokens`` stay
    in place). Seed name ``shuffle_captions``."""

    keep_tokens: int = 0
    """The first N comma-separated tags (the trigger word) are never shuffled or dropped."""

    caption_dropout_rate: float = 0.0
    """Probability that a sample's whole caption is replaced by the empty caption (trains the
    unconditional branch classifier-free guidance uses)."""

    caption_dropout_every_n_epochs: int | None = None
    """Every N-th epoch (epochs N, 2N, ... counting from 1, as kohya does), all captions of that epoch are
    dropped; null = never."""

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
    """Random colour jitter each time an image is used, kohya's: a third of the samples get either a hue
    shift of up to ±16° or a gamma of 0.95-1.05 (needs ``cache_latents=false``)."""

    flip_aug: bool = False
    """Random horizontal flip, half of the samples (cacheable: both orientations are encoded)."""

    random_crop: bool = False
    """Random instead of centre crop when a resized image is cut to its bucket (needs
    ``cache_latents=false``)."""

    num_workers: int = 0
    """DataLoader worker processes (kohya ``--max_data_loader_n_workers``); 0 = load in the main process.
    Results do not depend on it: every random choice is seeded by (seed, epoch, position)."""

    persistent_workers: bool = False
    """Keep the DataLoader workers alive between epochs (only with ``num_workers`` > 0)."""

    @property
    def size(self) -> tuple[int, int]:
        """The training resolution as ``(width, height)``."""
        if isinstance(self.resolution, int):
            return self.resolution, self.resolution
        width, height = self.resolution
        return int(width), int(height)

    def validate(self, key: str = "data") -> None:
        self._check_resolution(f"{key}.resolution")
        if not self.caption_extension.startswith("."):
            raise UserError(f"{key}.caption_extension", f"{self.caption_extension!r} must start with a dot.",
                            "Use e.g. `.txt` or `.caption`.")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            check_range(f"{key}.{name}", getattr(self, name), low=0.0, high=1.0)
        if self.caption_dropout_every_n_epochs is not None:
            check_range(f"{key}.caption_dropout_every_n_epochs", self.caption_dropout_every_n_epochs, low=1)
        check_range(f"{key}.keep_tokens", self.keep_tokens, low=0)
        check_range(f"{key}.num_workers", self.num_workers, low=0)
        if self.persistent_workers and self.num_workers == 0:
            raise UserError(f"{key}.persistent_workers", "needs worker processes, but data.num_workers is 0.",
                            f"Set `{key}.num_workers` to 1 or more, or `{key}.persistent_workers=false`.")
        check_choice(f"{key}.tag_frequency_sort", self.tag_frequency_sort, TAG_FREQUENCY_SORTS)
        pixel_augs = [name for name in ("color_aug", "random_crop") if getattr(self, name)]
        if self.cache_latents and pixel_augs:
            both = " and ".join(f"{key}.{name}" for name in pixel_augs)
            verb = "change" if len(pixel_augs) > 1 else "changes"
            raise UserError(f"{key}.cache_latents", f"cached latents are encoded once, but {both} {verb} the "
                            "pixels every time an image is used, so they cannot be combined.",
                            f"Set {key}.cache_latents=false (slower: every batch is encoded anew), or turn "
                            f"{both} off.")
        self.buckets.validate(f"{key}.buckets")
        if self.buckets.enabled:
            low, high = self.buckets.sides()
            width, height = self.size
            if min(width, height) < low or max(width, height) > high:
                raise UserError(f"{key}.resolution", f"{width}x{height} lies outside the bucket sides "
                                f"[{low}, {high}] ({key}.buckets.min_side / max_side rounded to "
                                f"{key}.buckets.step).",
                                f"Lower {key}.buckets.min_side or raise {key}.buckets.max_side (kohya uses 256 "
                                "and 1024 at 512 px), or change the resolution.")

    def _check_resolution(self, key: str) -> None:
        value = self.resolution
        if isinstance(value, int) and not isinstance(value, bool):
            sides = [value]
        elif (isinstance(value, list | tuple) and len(value) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            sides = list(value)
        else:
            raise UserError(key, f"{value!r} is neither an int nor [width, height].",
                            f"Use e.g. `{key}=512` or `{key}=[512,768]`.")
        for side in sides:
            check_range(key, side, low=8, high=4096)
            if side % 8:
                raise UserError(key, f"{side} is not a multiple of 8.",
                                "The VAE downsamples by 8; use e.g. 64, 512 or 768.")
