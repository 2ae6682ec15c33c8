"""Caption processing with kohya's semantics: keep_tokens, shuffle, tag dropout, caption dropout, epochs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lorasweep.config.data import DataConfig
from lorasweep.data.captions import check_keep_tokens, process_caption
from lorasweep.data.dataset import ImageItem
from lorasweep.errors import UserError

TAGS = [f"t{i}" for i in range(10)]
CAPTION = ", ".join(TAGS)


def _draws(cfg: DataConfig, n: int, *, caption: str = CAPTION, epoch: int = 1) -> list[str]:
    return [process_caption(caption, cfg, random.Random(i), epoch=epoch) for i in range(n)]


def test_shuffle_keeps_the_first_keep_tokens_in_place() -> None:
    cfg = DataConfig(shuffle_caption=True, keep_tokens=2)
    outs = [out.split(", ") for out in _draws(cfg, 400)]
    for tags in outs:
        assert tags[:2] == ["t0", "t1"]
        assert sorted(tags[2:]) == sorted(TAGS[2:])  # a permutation: nothing lost, nothing added
    assert len({tuple(t) for t in outs}) > 300  # really shuffled
    assert {t[2] for t in outs} == set(TAGS[2:])  # every free tag reaches the first free place


def test_shuffle_is_reproducible_from_the_generator() -> None:
    cfg = DataConfig(shuffle_caption=True, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.1)
    assert _draws(cfg, 50) == _draws(cfg, 50)


def test_tag_dropout_rate_and_kept_tags() -> None:
    cfg = DataConfig(caption_tag_dropout_rate=0.3, keep_tokens=2)
    outs = [out.split(", ") for out in _draws(cfg, 2000)]
    dropped = 0
    for tags in outs:
        assert tags[:2] == ["t0", "t1"]  # kept tags are never dropped
        assert tags[2:] == [t for t in TAGS[2:] if t in tags[2:]]  # no shuffle: order kept
        dropped += 8 - len(tags[2:])
    assert dropped / (2000 * 8) == pytest.approx(0.3, abs=0.02)


def test_caption_dropout_rate() -> None:
    cfg = DataConfig(caption_dropout_rate=0.2, shuffle_caption=True)
    outs = _draws(cfg, 4000)
    assert sum(out == "" for out in outs) / 4000 == pytest.approx(0.2, abs=0.025)
    assert all(out == "" or out.startswith("t") for out in outs)


def test_caption_dropout_every_n_epochs_empties_those_epochs_only() -> None:
    cfg = DataConfig(caption_dropout_every_n_epochs=3)
    for epoch in range(1, 10):
        outs = _draws(cfg, 20, epoch=epoch)
        if epoch in (3, 6, 9):
            assert outs == [""] * 20
        else:
            assert outs == [CAPTION] * 20


def test_epochs_count_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        process_caption(CAPTION, DataConfig(), random.Random(0), epoch=0)


def test_untouched_without_shuffle_or_tag_dropout() -> None:
    """kohya only splits into tags when shuffling or dropping tags; keep_tokens alone changes nothing."""
    cfg = DataConfig(keep_tokens=3)
    assert _draws(cfg, 5, caption="a photo of zorb,  red,") == ["a photo of zorb,  red,"] * 5
    assert _draws(cfg, 1, caption="first line\nsecond line") == ["first line"]


def test_tags_are_rejoined_with_comma_space() -> None:
    cfg = DataConfig(shuffle_caption=True, keep_tokens=1)
    out = process_caption("zorb,red ,, star", cfg, random.Random(0), epoch=1)
    assert out.startswith("zorb, ")
    assert sorted(out.split(", ")[1:]) == ["red", "star"]


def _items(*captions: str) -> list[ImageItem]:
    return [ImageItem(Path(f"{i}.png"), c, 1, "x") for i, c in enumerate(captions)]


def test_keep_tokens_larger_than_every_caption_is_refused() -> None:
    cfg = DataConfig(keep_tokens=3)
    with pytest.raises(UserError, match=r"data\.keep_tokens.*longest caption has only 2"):
        check_keep_tokens(_items("a, b", "c", ""), cfg)
    check_keep_tokens(_items("a, b", "c, d, e"), cfg)  # one caption long enough is fine
    check_keep_tokens(_items(""), DataConfig(keep_tokens=0))
