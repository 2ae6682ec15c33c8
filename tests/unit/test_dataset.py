"""Reading kohya-layout folders: repeats, captions, missing captions, image modes, the validation split."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorasweep.config.data import BucketConfig, DataConfig
from lorasweep.data.buckets import fit_image
from lorasweep.data.dataset import scan_folder, split_validation
from lorasweep.data.images import load_pixels, probe_image
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
    fit = fit_image(probe_image(path), (32, 32), BucketConfig(enabled=False), [(32, 32)])
    pixels = load_pixels(path, fit)
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


def test_format_tag_frequency_sorts_by_count_or_alpha() -> None:
    freq = {"2_x": {"zorb": 2, "Blue": 1, "red": 3, "apple": 1}}
    assert format_tag_frequency(freq).splitlines()[1:5] == ["3\tred", "2\tzorb", "1\tBlue", "1\tapple"]
    assert format_tag_frequency(freq, sort="alpha").splitlines()[1:5] == ["1\tapple", "1\tBlue", "3\tred",
                                                                          "2\tzorb"]
    with pytest.raises(ValueError, match="sort"):
        format_tag_frequency(freq, sort="random")


def test_scan_reads_sizes_reg_flag_and_first_caption_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _make(tmp_path / "2_person", "a", size=(80, 48), caption="\n  a person, smiling\nsecond line")
    with caplog.at_level(logging.WARNING, logger="lorasweep"):
        item = scan_folder(tmp_path, ".txt", "data.reg_dir", is_reg=True).items[0]
    assert (item.is_reg, item.size, item.caption) == (True, (80, 48), "a person, smiling")
    assert "more than one line" in caplog.text
    assert scan_folder(tmp_path, ".txt").items[0].is_reg is False
    with pytest.raises(UserError, match=r"data\.reg_dir: the folder .* does not exist"):
        scan_folder(tmp_path / "missing", ".txt", "data.reg_dir", is_reg=True)


def test_non_utf8_caption_names_the_file(tmp_path: Path) -> None:
    _make(tmp_path / "1_x", "a", caption=None)
    (tmp_path / "1_x" / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match=r"a\.txt: is not UTF-8"):
        scan_folder(tmp_path, ".txt")


def test_resolution_int_or_width_height() -> None:
    assert DataConfig(resolution=512, buckets=BucketConfig(min_side=256, max_side=1024, step=64)).size == (512, 512)
    cfg = DataConfig(resolution=[64, 96])
    cfg.validate()
    assert cfg.size == (64, 96)


def test_resolution_list_and_folder_preset_compose() -> None:
    from lorasweep.app import compose_config
    from lorasweep.config import to_train_config

    assert to_train_config(compose_config(["data.resolution=[64,128]"])).data.size == (64, 128)
    folder = to_train_config(compose_config(["data=folder", "data.train_dir=/tmp"])).data
    assert (folder.size, folder.buckets.min_side, folder.buckets.max_side, folder.buckets.step) == (
        (512, 512), 256, 1024, 64)


@pytest.mark.parametrize(("changes", "key", "words"), [
    ({"resolution": 65}, "data.resolution", "multiple of 8"),
    ({"resolution": [64, 100]}, "data.resolution", "multiple of 8"),
    ({"resolution": [64]}, "data.resolution", "[width, height]"),
    ({"resolution": "big"}, "data.resolution", "[width, height]"),
    ({"resolution": True}, "data.resolution", "[width, height]"),
    ({"resolution": 256}, "data.resolution", "outside the bucket sides"),
    ({"resolution": [16, 64]}, "data.resolution", "outside the bucket sides"),
    ({"caption_dropout_rate": 1.5}, "data.caption_dropout_rate", "out of range"),
    ({"caption_dropout_rate": -0.1}, "data.caption_dropout_rate", "out of range"),
    ({"caption_tag_dropout_rate": 2.0}, "data.caption_tag_dropout_rate", "out of range"),
    ({"caption_dropout_every_n_epochs": 0}, "data.caption_dropout_every_n_epochs", "out of range"),
    ({"keep_tokens": -1}, "data.keep_tokens", "out of range"),
    ({"num_workers": -1}, "data.num_workers", "out of range"),
    ({"persistent_workers": True}, "data.persistent_workers", "num_workers is 0"),
    ({"tag_frequency_sort": "random"}, "data.tag_frequency_sort", "count, alpha"),
    ({"caption_extension": "txt"}, "data.caption_extension", "start with a dot"),
    ({"color_aug": True}, "data.cache_latents", "data.color_aug"),
    ({"random_crop": True}, "data.cache_latents", "data.random_crop"),
    ({"buckets": BucketConfig(step=12)}, "data.buckets.step", "multiple of 8"),
    ({"buckets": BucketConfig(step=0)}, "data.buckets.step", "out of range"),
    ({"buckets": BucketConfig(min_side=128, max_side=64)}, "data.buckets.min_side", "larger than"),
    ({"buckets": BucketConfig(min_side=8, step=16)}, "data.buckets.min_side", "out of range"),
])
def test_bad_data_config_names_the_key(changes: dict[str, object], key: str, words: str) -> None:
    cfg = DataConfig(**changes)  # type: ignore[arg-type]
    with pytest.raises(UserError) as info:
        cfg.validate()
    assert info.value.where == key
    assert words in info.value.paragraph()


def test_cache_latents_refusal_names_both_keys_and_the_fix() -> None:
    with pytest.raises(UserError) as info:
        DataConfig(color_aug=True, random_crop=True).validate()
    text = info.value.paragraph()
    assert "data.color_aug and data.random_crop" in text and "data.cache_latents=false" in text
    DataConfig(color_aug=True, random_crop=True, cache_latents=False).validate()
    DataConfig(flip_aug=True).validate()  # flips are cacheable
    DataConfig(num_workers=2, persistent_workers=True).validate()
    DataConfig(resolution=256, buckets=BucketConfig(enabled=False)).validate()  # no bucket sides to respect
