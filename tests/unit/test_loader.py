"""TrainData: repeats, kohya's reg balancing, one bucket per batch, cached latents, and epochs that are a
pure function of (seed, epoch) whatever num_workers or a mid-epoch resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorasweep.config.data import DataConfig
from lorasweep.data import images
from lorasweep.data.dataset import ImageItem, scan_folder
from lorasweep.data.loader import TrainData, balance_reg_repeats
from lorasweep.data.synthetic import write_concept_dataset

#: Mixed sizes (several buckets at 64 px) and mixed modes.
IMAGES = [("3_cat", "a", (64, 64), "RGB"), ("3_cat", "b", (96, 48), "RGBA"), ("3_cat", "c", (48, 96), "L"),
          ("1_dog", "d", (80, 64), "CMYK"), ("1_dog", "e", (70, 50), "P"), ("1_dog", "f", (50, 120), "RGB")]


def _write(root: Path, folder: str, name: str, size: tuple[int, int], mode: str, caption: str) -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(name)) % 1000)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image = image.convert("RGBA") if mode == "RGBA" else image.convert(mode)
    image.save(root / folder / f"{name}.{'jpg' if mode == 'CMYK' else 'png'}")
    (root / folder / f"{name}.txt").write_text(caption)


@pytest.fixture
def train_items(tmp_path: Path) -> list[ImageItem]:
    for folder, name, size, mode in IMAGES:
        _write(tmp_path / "train", folder, name, size, mode, f"{folder[2:]}, {name}, red, big, photo")
    return scan_folder(tmp_path / "train", ".txt").items


def _reg_items(root: Path, folder: str, n: int) -> list[ImageItem]:
    for i in range(n):
        _write(root / "reg", folder, f"r{i}", (64, 64), "RGB", "a person")
    return scan_folder(root / "reg", ".txt", "data.reg_dir", is_reg=True).items


def _data(items: list[ImageItem], reg: list[ImageItem] | None = None, *, batch_size: int = 2,
          seed: int = 0, **cfg: object) -> TrainData:
    config = DataConfig(**{"cache_latents": False, **cfg})  # type: ignore[arg-type]
    config.validate()
    return TrainData(items, reg or [], config, seed=seed, batch_size=batch_size, prior_loss_weight=0.5)


def test_repeats_and_one_bucket_per_batch(train_items: list[ImageItem]) -> None:
    data = _data(train_items, batch_size=2)
    assert len({fit.bucket for fit in data.fits}) >= 3  # the mixed sizes really use several buckets
    for epoch in (1, 2):
        batches = data.batches(epoch)
        assert len(batches) == data.num_batches
        counts = Counter(d.index for batch in batches for d in batch)
        assert counts == {i: item.repeats for i, item in enumerate(train_items)}
        assert sorted(d.position for batch in batches for d in batch) == list(range(sum(counts.values())))
        for batch in batches:
            assert 1 <= len(batch) <= 2
            assert len({data.fits[d.index].bucket for d in batch}) == 1
    for batch, draws in zip(data.loader(1), data.batches(1), strict=True):
        width, height = data.fits[draws[0].index].bucket
        assert batch["pixels"].shape == (len(draws), 3, height, width)
        assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
        assert batch["indices"].tolist() == [d.index for d in draws]
    info = data.bucket_info()
    assert sum(b["count"] for b in info["buckets"].values()) == 12
    assert info["mean_img_ar_error"] < 0.2


def test_epoch_order_is_a_seeded_function_of_the_epoch(train_items: list[ImageItem]) -> None:
    a, b = _data(train_items), _data(train_items)
    assert a.batches(2) == b.batches(2)
    assert a.batches(1) != a.batches(2)
    assert _data(train_items, seed=1).batches(1) != a.batches(1)
    with pytest.raises(ValueError, match="from 1"):
        a.batches(0)
    with pytest.raises(ValueError, match="start_batch"):
        a.loader(1, start_batch=a.num_batches + 1)


def test_reg_balance_follows_kohya() -> None:
    def reg(*repeats: int) -> list[ImageItem]:
        return [ImageItem(Path(f"{i}.png"), "", r, "p", is_reg=True) for i, r in enumerate(repeats)]

    assert balance_reg_repeats(10, reg(1, 1, 1)) == [4, 3, 3]  # too few: extra repeats round-robin
    assert balance_reg_repeats(7, reg(5, 5, 5)) == [5, 5, 0]  # too many: the last are never used
    assert balance_reg_repeats(3, reg(1, 1, 1, 1, 1)) == [1, 1, 1, 0, 0]
    assert balance_reg_repeats(4, reg(2, 2)) == [2, 2]
    assert balance_reg_repeats(5, []) == []


def test_reg_items_are_balanced_and_weighted(tmp_path: Path, train_items: list[ImageItem]) -> None:
    reg = _reg_items(tmp_path, "1_person", 5)
    assert all(item.is_reg for item in reg)
    data = _data(train_items, reg, batch_size=3)
    assert data.num_train_images == 12 and data.num_reg_images == 5
    assert data.repeats[len(train_items):] == [3, 3, 2, 2, 2]  # 12 reg slots for 12 train slots
    seen_reg = 0
    for batch, draws in zip(data.loader(1), data.batches(1), strict=True):
        expected_reg = [d.index >= len(train_items) for d in draws]
        assert batch["is_reg"].tolist() == expected_reg
        assert batch["loss_weight"].tolist() == [0.5 if r else 1.0 for r in expected_reg]
        seen_reg += sum(expected_reg)
    assert seen_reg == 12


def test_surplus_reg_images_are_never_used_or_cached(tmp_path: Path, train_items: list[ImageItem]) -> None:
    reg = _reg_items(tmp_path, "10_person", 3)
    data = _data(train_items, reg, cache_latents=True)
    assert data.repeats[len(train_items):] == [10, 10, 0]  # whole folder repeats until 12 slots are filled
    assert data.num_reg_images == 30
    cached = {entry.item_index for entry in data.cache_entries()}
    assert cached == set(range(len(train_items) + 2))


def test_num_workers_and_resume_do_not_change_anything(train_items: list[ImageItem]) -> None:
    augs = {"shuffle_caption": True, "keep_tokens": 1, "caption_tag_dropout_rate": 0.3,
            "caption_dropout_rate": 0.2, "flip_aug": True, "random_crop": True, "color_aug": True}

    def run(data: TrainData, epoch: int, start: int = 0) -> list[tuple[list[str], torch.Tensor]]:
        return [(b["captions"], b["pixels"]) for b in data.loader(epoch, start_batch=start)]

    serial = _data(train_items, **augs)
    parallel = _data(train_items, num_workers=2, persistent_workers=True, **augs)
    for batch in parallel.loader(1):  # leaving an epoch early (max_steps) leaves nothing behind
        assert batch["captions"]
        break
    assert len(parallel.loader(2, start_batch=2)) == parallel.num_batches - 2
    for epoch in (1, 2):
        expected = run(serial, epoch)
        got = run(parallel, epoch)
        assert len(got) == len(expected) == serial.num_batches
        for (captions, pixels), (captions2, pixels2) in zip(expected, got, strict=True):
            assert captions == captions2
            assert torch.equal(pixels, pixels2)
        resumed = run(_data(train_items, **augs), epoch, start=3)
        assert [c for c, _ in resumed] == [c for c, _ in expected[3:]]
        assert all(torch.equal(p, q) for (_, p), (_, q) in zip(resumed, expected[3:], strict=True))
    # the augmentations really act: some captions differ from the file, the epochs differ
    first = [c for caps, _ in run(serial, 1) for c in caps]
    assert "" in first and any(c.count(",") < 4 for c in first if c)
    assert first != [c for caps, _ in run(serial, 2) for c in caps]


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_the_loader_leaves_the_global_torch_rng_alone(train_items: list[ImageItem], workers: int) -> None:
    """LoRA dropout draws from the global torch RNG; a resumed run starts its epoch iterator at another point
    than the uninterrupted run, so an iterator that drew from that RNG would shift every later mask."""
    data = _data(train_items, num_workers=workers)
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    for epoch in (1, 2):
        for _ in data.loader(epoch, start_batch=1):
            pass
    assert torch.equal(torch.rand(4), expected)


def test_caption_dropout_every_n_epochs_through_the_loader(train_items: list[ImageItem]) -> None:
    data = _data(train_items, caption_dropout_every_n_epochs=2)
    for epoch in (1, 2, 3, 4):
        captions = [c for batch in data.loader(epoch) for c in batch["captions"]]
        assert len(captions) == 12
        if epoch % 2 == 0:
            assert set(captions) == {""}
        else:
            assert "" not in captions


def test_cached_latents_use_both_orientations(train_items: list[ImageItem]) -> None:
    data = _data(train_items, cache_latents=True, flip_aug=True, batch_size=4)
    entries = data.cache_entries()
    assert len(entries) == 2 * len(train_items)
    keys = {entry.key: entry for entry in entries}
    assert len(keys) == len(entries)
    used = Counter()
    for epoch in range(1, 9):
        for batch in data.loader(epoch):
            assert batch["pixels"] is None
            assert all(key in keys for key in batch["cache_keys"])
            used.update(keys[key].flip for key in batch["cache_keys"])
    assert used[True] / (used[True] + used[False]) == pytest.approx(0.5, abs=0.12)
    plain, mirrored = (next(e for e in entries if e.item_index == 1 and e.flip == f) for f in (False, True))
    assert torch.equal(data.load_entry_pixels(mirrored), data.load_entry_pixels(plain).flip(-1))
    assert torch.equal(data.load_entry_pixels(plain), images.load_pixels(train_items[1].path, plain.fit))
    no_flip = _data(train_items, cache_latents=True)
    assert len(no_flip.cache_entries()) == len(train_items)
    assert all("|orig" in key for batch in no_flip.loader(1) for key in batch["cache_keys"])


def test_validation_pixels_are_never_augmented(train_items: list[ImageItem]) -> None:
    data = _data(train_items, flip_aug=True, random_crop=True, color_aug=True)
    first = data.val_pixels(train_items[:3])
    again = data.val_pixels(train_items[:3])
    for item, (fit, pixels), (_, pixels2) in zip(train_items[:3], first, again, strict=True):
        assert fit == data.fit(item)
        assert torch.equal(pixels, images.load_pixels(item.path, fit))
        assert torch.equal(pixels, pixels2)


def test_synthetic_set_is_one_64px_bucket(tmp_path: Path) -> None:
    items = scan_folder(write_concept_dataset(tmp_path / "syn", n_images=6), ".txt").items
    data = TrainData(items, [], DataConfig(), seed=0, batch_size=4, prior_loss_weight=1.0)
    assert {fit.bucket for fit in data.fits} == {(64, 64)}
    assert [bucket for bucket, _ in data.bucket_members] == [(64, 64)]
