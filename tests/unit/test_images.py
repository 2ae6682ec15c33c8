"""Pixel loading and kohya's augmentations: image modes, EXIF rotation, crop, flip, colour jitter."""

from __future__ import annotations

import colorsys
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorasweep.data.buckets import Fit
from lorasweep.data.images import color_augment, load_pixels, probe_image, random_crop_offset
from lorasweep.errors import UserError


def _noise(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


def _as_uint8(pixels: torch.Tensor) -> np.ndarray:
    return np.round((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.uint8)


@pytest.mark.parametrize(("mode", "size"), [("RGB", (80, 64)), ("RGBA", (64, 96)), ("LA", (70, 70)),
                                            ("L", (128, 40)), ("CMYK", (50, 90)), ("P", (64, 64)),
                                            ("I;16", (64, 48))])
def test_every_mode_and_size_loads_as_rgb(tmp_path: Path, mode: str, size: tuple[int, int]) -> None:
    colours = {"RGB": (10, 200, 30), "RGBA": (10, 200, 30, 255), "LA": (128, 255), "L": 128,
               "CMYK": (0, 255, 0, 0), "P": 3, "I;16": 40000}
    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    image = Image.new(mode, size, colours[mode])
    if mode == "P":
        image.putpalette([0, 0, 0] * 3 + [250, 20, 40] + [0, 0, 0] * 252)
    image.save(path)
    assert probe_image(path) == size
    fit = Fit((32, 32), (32 * size[0] // min(size), 32 * size[1] // min(size)))
    pixels = load_pixels(path, fit)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    expected = {"RGB": (10, 200, 30), "RGBA": (10, 200, 30), "LA": (128,) * 3, "L": (128,) * 3,
                "P": (250, 20, 40), "I;16": (156,) * 3}.get(mode)
    if expected is not None:
        assert np.abs(_as_uint8(pixels).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_transparent_pixels_become_white(tmp_path: Path, mode: str) -> None:
    if mode == "RGBA":
        image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    else:
        image = Image.new("P", (40, 40), 0)
        image.info["transparency"] = 0
    image.save(tmp_path / "t.png", **({"transparency": 0} if mode == "P" else {}))
    pixels = load_pixels(tmp_path / "t.png", Fit((40, 40), (40, 40)))
    assert torch.allclose(pixels, torch.ones_like(pixels), atol=1e-2)


def test_exif_rotation_is_honoured(tmp_path: Path) -> None:
    stored = np.zeros((40, 80, 3), dtype=np.uint8)  # 80 wide, 40 high; left half red
    stored[:, :40] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    assert probe_image(tmp_path / "r.jpg") == (40, 80)
    pixels = _as_uint8(load_pixels(tmp_path / "r.jpg", Fit((40, 80), (40, 80))))
    assert pixels[5, 20, 0] > 200 and pixels[75, 20, 0] < 60  # the red half is now on top


def test_unreadable_file_names_itself(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"bad\.png: cannot be read as an image"):
        probe_image(tmp_path / "bad.png")
    with pytest.raises(UserError, match=r"bad\.png"):
        load_pixels(tmp_path / "bad.png", Fit((8, 8), (8, 8)))


def test_centre_crop_and_resize_filters(tmp_path: Path) -> None:
    path = _noise(tmp_path / "n.png", (96, 64))
    source = np.asarray(Image.open(path))
    same = _as_uint8(load_pixels(path, Fit((64, 64), (96, 64))))
    assert np.array_equal(same, source[:, 16:80])  # no resize: an exact centred window
    halved = _as_uint8(load_pixels(path, Fit((48, 32), (48, 32))))
    area_mean = source.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))  # shrinking averages areas (kohya: AREA)
    assert np.abs(halved.astype(float) - area_mean).max() <= 1.0


def test_flip_mirrors_exactly(tmp_path: Path) -> None:
    path = _noise(tmp_path / "n.png", (70, 50))
    fit = Fit((48, 32), (67, 48))
    plain = load_pixels(path, fit, crop=(5, 9))
    flipped = load_pixels(path, fit, crop=(5, 9), flip=True)
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)


def test_random_crop_varies_and_stays_in_bounds(tmp_path: Path) -> None:
    path = _noise(tmp_path / "n.png", (90, 60))
    fit = Fit((48, 32), (90, 60))
    source = np.asarray(Image.open(path))
    offsets = [random_crop_offset(fit, random.Random(i)) for i in range(200)]
    assert all(0 <= left <= 42 and 0 <= top <= 28 for left, top in offsets)
    assert len(set(offsets)) > 100
    assert len({o[0] for o in offsets}) > 30 and len({o[1] for o in offsets}) > 20
    for left, top in offsets[:5]:
        window = _as_uint8(load_pixels(path, fit, crop=(left, top)))
        assert np.array_equal(window, source[top:top + 32, left:left + 48])
    with pytest.raises(ValueError, match="outside"):
        load_pixels(path, fit, crop=(43, 0))


def test_color_aug_changes_colours_only_when_on(tmp_path: Path) -> None:
    path = _noise(tmp_path / "n.png", (32, 32))
    fit = Fit((32, 32), (32, 32))
    plain = load_pixels(path, fit)
    assert torch.equal(load_pixels(path, fit, color_rng=None), plain)
    changed = 0
    for seed in range(60):
        jittered = load_pixels(path, fit, color_rng=random.Random(seed))
        assert jittered.shape == plain.shape
        if not torch.equal(jittered, plain):
            changed += 1
            # a hue shift of at most 16° or a gamma of 0.95-1.05: colours move, but not far
            assert (jittered - plain).abs().mean() < 0.15
    assert 8 <= changed <= 35  # kohya jitters about a third of the samples


def test_color_aug_is_a_small_hue_shift_or_gamma() -> None:
    """kohya's jitter: a third of the draws; half of those rotate the hue by up to 16°, half apply a gamma
    of 0.95-1.05 (the same curve on every channel)."""
    colour = np.array([200, 80, 40], dtype=np.uint8)
    image = np.tile(colour, (4, 4, 1))
    hue0 = colorsys.rgb_to_hsv(*(colour / 255.0))[0]
    kinds = {"none": 0, "hue": 0, "gamma": 0}
    for seed in range(600):
        out = color_augment(image, random.Random(seed))[0, 0].astype(float)
        if np.array_equal(out, colour):
            kinds["none"] += 1
            continue
        gammas = np.log(out / 255.0) / np.log(colour / 255.0)
        if np.ptp(gammas) < 0.02:
            assert 0.94 <= gammas.mean() <= 1.06
            kinds["gamma"] += 1
        else:
            shift = (colorsys.rgb_to_hsv(*(out / 255.0))[0] - hue0 + 0.5) % 1.0 - 0.5
            assert 0 < abs(shift) * 360 <= 16 + 3  # plus 8-bit HSV rounding
            kinds["hue"] += 1
    assert kinds["none"] / 600 == pytest.approx(0.67, abs=0.06)
    assert kinds["hue"] / 600 == pytest.approx(0.165, abs=0.05)
    assert kinds["gamma"] / 600 == pytest.approx(0.165, abs=0.05)
