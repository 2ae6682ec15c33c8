"""Caption processing each time a sample is drawn, with kohya's semantics and order
(sd-scripts ``BaseDataset.process_caption``):

1. caption dropout: with probability ``caption_dropout_rate``, and in every epoch that is a multiple of
   ``caption_dropout_every_n_epochs`` (epochs count from 1), the caption becomes ``""``;
2. otherwise, only if ``shuffle_caption`` or ``caption_tag_dropout_rate`` is on, the caption is split into
   comma-separated tags; the first ``keep_tokens`` stay fixed, the rest are shuffled, then each of those
   is dropped with probability ``caption_tag_dropout_rate``; the tags are joined with ``", "``.

A caption with neither option is used exactly as written (so ``keep_tokens`` alone changes nothing).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from lorasweep.config.data import DataConfig
from lorasweep.data.dataset import ImageItem
from lorasweep.data.tags import split_tags
from lorasweep.errors import UserError


def process_caption(caption: str, cfg: DataConfig, rng: random.Random, *, epoch: int) -> str:
    """The caption a sample trains with in ``epoch`` (1-based, kohya's ``current_epoch``), drawing every
    random choice from ``rng`` (seed it per sample so the result is reproducible)."""
    if epoch < 1:
        raise ValueError(f"epochs count from 1, got {epoch}")
    dropped = cfg.caption_dropout_rate > 0 and rng.random() < cfg.caption_dropout_rate
    every = cfg.caption_dropout_every_n_epochs
    if dropped or (every is not None and epoch % every == 0):
        return ""
    caption = caption.strip().split("\n", 1)[0].strip()
    if not (cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0):
        return caption
    tags = split_tags(caption)
    fixed, flexible = tags[:cfg.keep_tokens], tags[cfg.keep_tokens:]
    if cfg.shuffle_caption:
        rng.shuffle(flexible)
    if cfg.caption_tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= cfg.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible)


def check_keep_tokens(items: Iterable[ImageItem], cfg: DataConfig, key: str = "data.keep_tokens") -> None:
    """Refuse a ``keep_tokens`` larger than every caption's tag count: then nothing would ever be shuffled
    or dropped, which is never what was meant (usually captions without commas, or a typo)."""
    if cfg.keep_tokens == 0:
        return
    most = max((len(split_tags(item.caption)) for item in items), default=0)
    if most < cfg.keep_tokens:
        raise UserError(key, f"is {cfg.keep_tokens}, but the longest caption has only {most} comma-separated "
                        "tags, so no tag would ever be shuffled or dropped.",
                        f"Set {key} to the number of fixed tags at the start of your captions (usually 1, "
                        "the trigger word), and separate tags with commas.")
