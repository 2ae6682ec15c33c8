"""kohya's aspect-ratio buckets: the bucket set, bucket choice, resize sizes, no_upscale, fixed size."""

from __future__ import annotations

import itertools

import pytest

from lorasweep.config.data import BucketConfig
from lorasweep.data.buckets import Fit, aspect_error, fit_image, make_buckets
from lorasweep.errors import UserError

AT_512 = BucketConfig(min_side=256, max_side=1024, step=64)
SIZES = [(w, h) for w, h in itertools.product((40, 97, 200, 333, 512, 640, 1000, 1536, 3000),
                                               (48, 120, 256, 400, 512, 777, 1024, 2500))]


def test_bucket_set_at_512() -> None:
    buckets = make_buckets((512, 512), AT_512)
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert 0.75 * 512 * 512 <= w * h <= 512 * 512  # about the training area, never above it
        assert (h, w) in buckets
    for expected in [(512, 512), (256, 1024), (320, 768), (384, 640), (448, 576), (576, 448), (1024, 256)]:
        assert expected in buckets


def test_non_square_resolution_sets_the_area() -> None:
    buckets = make_buckets((512, 768), AT_512)
    assert (576, 576) in buckets  # kohya's square: floor(sqrt(512*768) / 64) * 64
    assert (512, 768) in buckets and (768, 512) in buckets
    assert all(w * h <= 512 * 768 for w, h in buckets)


def test_default_synthetic_images_get_one_64px_bucket() -> None:
    cfg = BucketConfig()
    buckets = make_buckets((64, 64), cfg)
    assert fit_image((64, 64), (64, 64), cfg, buckets) == Fit((64, 64), (64, 64))


@pytest.mark.parametrize("size", SIZES)
def test_bucket_choice(size: tuple[int, int]) -> None:
    buckets = make_buckets((512, 512), AT_512)
    fit = fit_image(size, (512, 512), AT_512, buckets)
    assert fit.bucket in buckets
    # resized covers the bucket with one side exact, keeping the image's aspect ratio to rounding
    assert fit.resized[0] >= fit.bucket[0] and fit.resized[1] >= fit.bucket[1]
    assert fit.bucket[0] == fit.resized[0] or fit.bucket[1] == fit.resized[1]
    assert fit.resized[0] / fit.resized[1] == pytest.approx(size[0] / size[1], rel=2 / min(fit.resized))
    # the closest aspect ratio of all buckets
    ratios = sorted(w / h for w, h in buckets)
    image_ratio = size[0] / size[1]
    assert abs(aspect_error(size, fit)) == pytest.approx(min(abs(r - image_ratio) for r in ratios))
    if ratios[0] <= image_ratio <= ratios[-1]:
        largest_gap = max(b - a for a, b in itertools.pairwise(ratios))
        assert abs(aspect_error(size, fit)) <= largest_gap / 2


def test_an_image_of_a_bucket_size_is_not_resized() -> None:
    buckets = make_buckets((512, 512), AT_512)
    assert fit_image((384, 640), (512, 512), AT_512, buckets) == Fit((384, 640), (384, 640))


@pytest.mark.parametrize("size", [s for s in SIZES if min(s) >= 64])
def test_no_upscale_never_enlarges(size: tuple[int, int]) -> None:
    cfg = BucketConfig(min_side=256, max_side=1024, step=64, no_upscale=True)
    assert make_buckets((512, 512), cfg) == []
    fit = fit_image(size, (512, 512), cfg, [])
    assert fit.resized[0] <= size[0] and fit.resized[1] <= size[1]
    assert fit.bucket[0] <= fit.resized[0] and fit.bucket[1] <= fit.resized[1]
    assert fit.bucket[0] % 64 == 0 and fit.bucket[1] % 64 == 0
    assert fit.resized[0] - fit.bucket[0] < 64 and fit.resized[1] - fit.bucket[1] < 64
    assert fit.bucket[0] * fit.bucket[1] <= 512 * 512
    if size[0] * size[1] <= 512 * 512:
        assert fit.resized == size  # small images keep their size, only the bucket crops the remainder
    else:
        assert fit.resized[0] / fit.resized[1] == pytest.approx(size[0] / size[1], rel=0.15)


def test_no_upscale_examples() -> None:
    cfg = BucketConfig(min_side=256, max_side=1024, step=64, no_upscale=True)
    assert fit_image((300, 200), (512, 512), cfg, []) == Fit((256, 192), (300, 200))
    big = fit_image((2048, 1024), (512, 512), cfg, [])
    assert big == Fit((640, 320), (640, 320))  # the height lands on a step and keeps the ratio exact
    odd = fit_image((1000, 700), (512, 512), cfg, [])
    assert odd == Fit((576, 384), (576, 403))  # width on a step: ratio 1.5 is closer to 1.43 than 1.33


def test_no_upscale_image_smaller_than_step_is_refused() -> None:
    cfg = BucketConfig(step=64, min_side=256, max_side=1024, no_upscale=True)
    with pytest.raises(UserError, match=r"tiny\.png.*data\.buckets\.step=64"):
        fit_image((40, 300), (512, 512), cfg, [], where="tiny.png")


def test_buckets_off_gives_the_fixed_size_by_covering_and_cropping() -> None:
    cfg = BucketConfig(enabled=False)
    assert make_buckets((64, 96), cfg) == [(64, 96)]
    wide = fit_image((100, 50), (64, 64), cfg, [(64, 64)])
    assert wide == Fit((64, 64), (128, 64)) and wide.centre_crop == (32, 0)
    tall = fit_image((30, 90), (64, 96), cfg, [(64, 96)])
    assert tall == Fit((64, 96), (64, 192)) and tall.crop_room == (0, 96)
