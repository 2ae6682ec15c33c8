"""Reading kohya-layout folders: repeats, captions, missing captions, image modes, the validation split."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorasweep.data.dataset import load_pixels, scan_folder, split_validation
from lorasweep.data.tags import format_tag_frequency, tag_frequency
from lorasweep.errors import UserError


def _make(folder: Path, name: str, mode: str = "RGB", size: tuple[int, int] = (80, 64),
          caption: str | None = "a, b") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    colour = {"RGB": (10, 200, 30), "RGBA": (10, 200, 30, 0), "L": 128, "CMYK": (0, 255, 0, 0)}[mode]
    Image.new(mode, size, colour).save(folder / f"{name}.{'jpg' if mode == 'CMYK' else 'png'}")
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption + "\n")


def test_scan_repeats_and_captions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _make(tmp_path / "3_cat", "a", caption="cat, sitting")
    _make(tmp_path / "3_cat", "b", caption=None)
    _make(tmp_path / "10_dog", "c", caption="dog")
    (tmp_path / "notes").mkdir()
    (tmp_path / "3_cat" / "readme.md").write_text("ignored")
    with caplog.at_level(logging.WARNING, logger="lorasweep"):
        scan = scan_folder(tmp_path, ".txt")
    assert [(it.path.name, it.repeats, it.concept, it.caption) for it in scan.items] == [
        ("c.png", 10, "dog", "dog"), ("a.png", 3, "cat", "cat, sitting"), ("b.png", 3, "cat", "")]
    assert scan.missing_captions == 1
    assert "b.txt" in caplog.text


def test_caption_extension(tmp_path: Path) -> None:
    _make(tmp_path / "1_x", "a", caption=None)
    (tmp_path / "1_x" / "a.caption").write_text("from caption file")
    assert scan_folder(tmp_path, ".caption").items[0].caption == "from caption file"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "CMYK"])
def test_any_image_mode_loads_as_rgb(tmp_path: Path, mode: str) -> None:
    _make(tmp_path / "1_x", "a", mode=mode, size=(96, 64))
    path = next((tmp_path / "1_x").glob("a.*"))
    pixels = load_pixels(path, 32)
    assert pixels.shape == (3, 32, 32)
    assert pixels.min() >= -1 and pixels.max() <= 1
    if mode == "RGBA":  # fully transparent composites onto white
        assert torch.allclose(pixels, torch.ones_like(pixels), atol=1e-2)


def test_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    for i in range(12):
        _make(tmp_path / "1_x", f"{i:02d}")
    items = scan_folder(tmp_path, ".txt").items
    train, val = split_validation(items, 0.25, seed=3)
    assert len(val) == 3 and len(train) == 9
    assert not {it.path for it in train} & {it.path for it in val}
    assert split_validation(items, 0.25, seed=3) == (train, val)
    assert split_validation(items, 0.25, seed=4)[1] != val


def test_split_needs_two_images(tmp_path: Path) -> None:
    _make(tmp_path / "1_x", "a")
    with pytest.raises(UserError, match=r"validation\.split"):
        split_validation(scan_folder(tmp_path, ".txt").items, 0.25, seed=0)


def test_tag_frequency_counts_per_folder(tmp_path: Path) -> None:
    _make(tmp_path / "2_x", "a", caption="zorb, red, left")
    _make(tmp_path / "2_x", "b", caption="zorb, blue, left, left")
    freq = tag_frequency(scan_folder(tmp_path, ".txt").items)
    assert freq == {"2_x": {"zorb": 2, "left": 2, "red": 1, "blue": 1}}
    assert format_tag_frequency(freq).splitlines()[:5] == ["[2_x]", "2\tleft", "2\tzorb", "1\tblue", "1\tred"]
