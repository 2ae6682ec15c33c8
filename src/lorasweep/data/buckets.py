"""kohya's aspect-ratio buckets: which bucket an image trains in and the size it is resized to first.

Semantics follow sd-scripts ``library/train_util.py`` (``BucketManager.select_bucket``) and
``library/model_util.py`` (``make_bucket_resolutions``):

* the bucket set holds every ``(w, h)`` with sides multiples of ``step`` in ``[min_side, max_side]`` whose
  area is the largest not above the training area ``W×H`` for that width, both orientations, plus the
  square of about that area;
* an image goes to the bucket of the closest aspect ratio (its own size if that is a bucket), is resized
  so that it *covers* the bucket (one side exact, the other overhanging) and is then cropped to it;
* with ``no_upscale`` there is no fixed set: an image larger than the training area is shrunk to that area
  (one side landing on a ``step`` multiple), and the bucket is its size rounded down to ``step``;
* with buckets off there is one bucket, the training size, filled the same covering way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorasweep.config.data import BucketConfig
from lorasweep.errors import UserError


@dataclass(frozen=True)
class Fit:
    """How one image becomes a training tensor: resize to ``resized``, then crop to ``bucket`` (both w, h)."""

    bucket: tuple[int, int]
    resized: tuple[int, int]

    @property
    def crop_room(self) -> tuple[int, int]:
        """How many pixels the resized image overhangs the bucket (the range of a crop's left, top)."""
        return self.resized[0] - self.bucket[0], self.resized[1] - self.bucket[1]

    @property
    def centre_crop(self) -> tuple[int, int]:
        """(left, top) of the centred crop, kohya's default (``trim_size // 2``)."""
        room_w, room_h = self.crop_room
        return room_w // 2, room_h // 2


def make_buckets(size: tuple[int, int], cfg: BucketConfig) -> list[tuple[int, int]]:
    """The predefined bucket sizes ``(w, h)`` for training size ``size``, sorted.

    Buckets off: the one fixed size. ``no_upscale``: an empty list, because each image's bucket then comes
    from its own size (see :func:`fit_image`).
    """
    if not cfg.enabled:
        return [size]
    if cfg.no_upscale:
        return []
    low, high = cfg.sides()
    step = cfg.step
    area = size[0] * size[1]
    square = math.isqrt(area) // step * step
    resos = {(square, square)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def fit_image(image_size: tuple[int, int], size: tuple[int, int], cfg: BucketConfig,
              buckets: list[tuple[int, int]], *, where: str = "an image") -> Fit:
    """The bucket and resize size of an image of ``image_size`` (w, h), for training size ``size``.

    ``buckets`` comes from :func:`make_buckets` with the same arguments. ``where`` names the image in the
    error raised when ``no_upscale`` leaves it no bucket (a side smaller than ``step``).
    """
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    if not cfg.enabled:
        return _cover(image_size, size)
    if not cfg.no_upscale:
        if not buckets:
            raise ValueError("no buckets: call make_buckets() with the same config")
        if tuple(image_size) in set(buckets):
            return Fit(tuple(image_size), tuple(image_size))  # type: ignore[arg-type]
        aspect = width / height
        bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))  # the first of equally close ones
        return _cover(image_size, bucket)
    resized = _shrink_to_area(image_size, size[0] * size[1], cfg.step)
    bucket = (resized[0] - resized[0] % cfg.step, resized[1] - resized[1] % cfg.step)
    if min(bucket) == 0:
        raise UserError(where, f"is {width}x{height} px; with data.buckets.no_upscale=true a side smaller than "
                        f"data.buckets.step={cfg.step} px leaves it no bucket.",
                        "Remove or enlarge the image, lower data.buckets.step, or set "
                        "data.buckets.no_upscale=false.")
    return Fit(bucket, resized)


def aspect_error(image_size: tuple[int, int], fit: Fit) -> float:
    """Bucket aspect ratio minus image aspect ratio (kohya's ``ar_error``; 0 = no cropping needed)."""
    return fit.bucket[0] / fit.bucket[1] - image_size[0] / image_size[1]


def _cover(image_size: tuple[int, int], bucket: tuple[int, int]) -> Fit:
    """Scale so one side matches the bucket and the other overhangs it (kohya rounds half up)."""
    width, height = image_size
    wider = width / height > bucket[0] / bucket[1]
    scale = bucket[1] / height if wider else bucket[0] / width  # the bucket side the image does not overhang
    resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
    return Fit(bucket, resized)


def _round_to_step(x: float, step: int) -> int:
    rounded = int(x + 0.5)
    return rounded - rounded % step


def _shrink_to_area(image_size: tuple[int, int], max_area: int, step: int) -> tuple[int, int]:
    """kohya's ``no_upscale`` resize: keep small images as they are; shrink larger ones to ``max_area``
    with whichever side lands on a ``step`` multiple keeping the aspect ratio closer."""
    width, height = image_size
    if width * height <= max_area:
        return width, height
    aspect = width / height
    target_w = math.sqrt(max_area * aspect)
    target_h = max_area / target_w
    by_width = _round_to_step(target_w, step)
    h_for_width = _round_to_step(by_width / aspect, step)
    by_height = _round_to_step(target_h, step)
    w_for_height = _round_to_step(by_height * aspect, step)
    error_w = abs(by_width / h_for_width - aspect) if h_for_width else math.inf
    error_h = abs(w_for_height / by_height - aspect) if by_height else math.inf
    if error_w < error_h:
        return by_width, int(by_width / aspect + 0.5)
    return int(by_height * aspect + 0.5), by_height
