"""Training batches with kohya's semantics: repeats, regularisation balancing, buckets, augmentation.

What an epoch is (sd-scripts ``DreamBoothDataset`` / ``BaseDataset.make_buckets``):

* every train image appears ``repeats`` times; regularisation images fill as many slots as the train
  images with repeats (:func:`balance_reg_repeats`);
* each bucket's slots are shuffled and cut into batches of ``batch_size`` (a bucket's last batch may be
  short), and the batches of all buckets are shuffled together, so every batch holds one bucket shape.

Epochs are numbered from 1 (kohya's ``current_epoch``: ``caption_dropout_every_n_epochs=N`` empties the
captions of epochs N, 2N, ...). Every random choice (order, flip, crop offset, colour jitter, caption
shuffle and dropout) comes from its own generator seeded by (seed, epoch, sample position in the epoch,
purpose), so an epoch is a pure function of (seed, epoch): it does not depend on ``num_workers``, on
which other augmentations are on, or on resuming in the middle of it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lorasweep.config.data import DataConfig
from lorasweep.data import images
from lorasweep.data.buckets import Fit, aspect_error, make_buckets
from lorasweep.data.captions import process_caption
from lorasweep.data.dataset import ImageItem, fit_item


@dataclass(frozen=True)
class Draw:
    """One sample slot of an epoch."""

    index: int
    """Index into :attr:`TrainData.items` (train items first, then reg items)."""
    position: int
    """Running number of the slot in its epoch; seeds the slot's random choices."""
    is_reg: bool


@dataclass(frozen=True)
class CacheEntry:
    """One latent to encode once when ``data.cache_latents``: an item in one orientation."""

    key: str
    """Stable name of these pixels (file, bucket, resize, orientation); batches refer to it."""
    item_index: int
    flip: bool
    fit: Fit


def balance_reg_repeats(num_train_images: int, reg_items: Sequence[ImageItem]) -> list[int]:
    """How often each reg image appears per epoch, kohya's way: walk the reg images in order giving each
    its own repeats until they fill ``num_train_images`` slots (later images get 0 and are never used);
    if one pass is not enough, add one repeat per image, round-robin, until they do."""
    counts = [0] * len(reg_items)
    if not reg_items:
        return counts
    filled = 0
    first_pass = True
    while filled < num_train_images:
        for i, item in enumerate(reg_items):
            step = item.repeats if first_pass else 1
            counts[i] += step
            filled += step
            if filled >= num_train_images:
                break
        first_pass = False
    return counts


def _rng(seed: int, epoch: int, position: int, purpose: str) -> random.Random:
    """A generator for one purpose of one slot; string seeds hash with SHA-512, the same in every process."""
    return random.Random(f"lorasweep/{seed}/{epoch}/{position}/{purpose}")


def cache_key(item: ImageItem, fit: Fit, flip: bool) -> str:
    return (f"{item.path}|{fit.bucket[0]}x{fit.bucket[1]}|{fit.resized[0]}x{fit.resized[1]}|"
            f"{'flip' if flip else 'orig'}")


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class TrainData:
    """Train items + reg items, their bucket fits, and deterministic epochs (see the module docstring)."""

    def __init__(self, train_items: Sequence[ImageItem], reg_items: Sequence[ImageItem], cfg: DataConfig, *,
                 seed: int, batch_size: int, prior_loss_weight: float) -> None:
        if not train_items:
            raise ValueError("TrainData needs at least one train item")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.seed = seed
        self.batch_size = batch_size
        self.prior_loss_weight = prior_loss_weight
        self.items: list[ImageItem] = [*train_items, *reg_items]
        self.num_train_items = len(train_items)
        self.size = cfg.size
        self.buckets = make_buckets(self.size, cfg.buckets)
        self.fits: list[Fit] = [self.fit(item) for item in self.items]
        train_repeats = [item.repeats for item in train_items]
        #: Appearances per epoch of each item (reg items balanced against the train images).
        self.repeats: list[int] = train_repeats + balance_reg_repeats(sum(train_repeats), reg_items)
        #: kohya's counts for metadata: train and reg images with their folder repeats (before balancing).
        self.num_train_images = sum(train_repeats)
        self.num_reg_images = sum(item.repeats for item in reg_items)
        members: dict[tuple[int, int], list[int]] = {}
        for index, (fit, count) in enumerate(zip(self.fits, self.repeats, strict=True)):
            members.setdefault(fit.bucket, []).extend([index] * count)
        #: Slots of an epoch per used bucket, buckets sorted by size (kohya sorts them too).
        self.bucket_members: list[tuple[tuple[int, int], list[int]]] = sorted(members.items())
        #: Batches per epoch; the same in every epoch.
        self.num_batches = sum(math.ceil(len(m) / batch_size) for _, m in self.bucket_members)
        self._epoch_cache: tuple[int, list[list[Draw]]] | None = None
        self._sampler: _EpochSampler | None = None
        self._loader: DataLoader[dict[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Worker processes get the data, not the loader that feeds them."""
        state = self.__dict__.copy()
        state.update(_sampler=None, _loader=None, _epoch_cache=None)
        return state

    def fit(self, item: ImageItem) -> Fit:
        """The bucket and resize size of ``item`` (any item, e.g. a validation image)."""
        return fit_item(item, self.cfg, self.buckets)

    def bucket_info(self) -> dict[str, Any]:
        """kohya's ``ss_bucket_info``: slots per bucket (with repeats) and the mean |aspect error| of the
        used images."""
        errors = [abs(aspect_error(item.size if min(item.size) > 0 else images.probe_image(item.path), fit))
                  for item, fit, count in zip(self.items, self.fits, self.repeats, strict=True) if count]
        return {"buckets": {i: {"resolution": list(bucket), "count": len(slots)}
                            for i, (bucket, slots) in enumerate(self.bucket_members)},
                "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}

    # --- epochs -------------------------------------------------------------------------------------------

    def batches(self, epoch: int) -> list[list[Draw]]:
        """The batches of ``epoch`` (1-based), in training order; a pure function of (seed, epoch)."""
        if epoch < 1:
            raise ValueError(f"epochs count from 1, got {epoch}")
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = _rng(self.seed, epoch, -1, "order")
        order = [(b, k) for b, (_, slots) in enumerate(self.bucket_members)
                 for k in range(math.ceil(len(slots) / self.batch_size))]
        rng.shuffle(order)
        shuffled = []
        for _, slots in self.bucket_members:
            slots = list(slots)
            rng.shuffle(slots)
            shuffled.append(slots)
        batches: list[list[Draw]] = []
        position = 0
        for b, k in order:
            chunk = shuffled[b][k * self.batch_size:(k + 1) * self.batch_size]
            batches.append([Draw(index, position + j, index >= self.num_train_items)
                            for j, index in enumerate(chunk)])
            position += len(chunk)
        self._epoch_cache = (epoch, batches)
        return batches

    def caption(self, draw: Draw, epoch: int) -> str:
        """The processed caption of a slot (shuffle, keep_tokens, tag and caption dropout)."""
        rng = _rng(self.seed, epoch, draw.position, "caption")
        return process_caption(self.items[draw.index].caption, self.cfg, rng, epoch=epoch)

    def flipped(self, draw: Draw, epoch: int) -> bool:
        """Whether a slot is mirrored: half of the time with ``flip_aug`` (also for cached latents)."""
        return self.cfg.flip_aug and _rng(self.seed, epoch, draw.position, "flip").random() < 0.5

    def pixels(self, draw: Draw, epoch: int) -> torch.Tensor:
        """The augmented ``[3, H, W]`` pixels of a slot."""
        fit = self.fits[draw.index]
        crop = (images.random_crop_offset(fit, _rng(self.seed, epoch, draw.position, "crop"))
                if self.cfg.random_crop else None)
        color_rng = _rng(self.seed, epoch, draw.position, "colour") if self.cfg.color_aug else None
        return images.load_pixels(self.items[draw.index].path, fit, flip=self.flipped(draw, epoch), crop=crop,
                                  color_rng=color_rng)

    def collate(self, epoch: int, batch_index: int) -> dict[str, Any]:
        """Batch ``batch_index`` of ``epoch`` as the loader yields it."""
        batch = self.batches(epoch)[batch_index]
        flips = [self.flipped(d, epoch) for d in batch]
        cached = self.cfg.cache_latents
        return {
            "captions": [self.caption(d, epoch) for d in batch],
            "pixels": None if cached else torch.stack([self.pixels(d, epoch) for d in batch]),
            "cache_keys": ([cache_key(self.items[d.index], self.fits[d.index], f) for d, f in zip(batch, flips,
                                                                                                  strict=True)]
                           if cached else None),
            "loss_weight": torch.tensor([self.prior_loss_weight if d.is_reg else 1.0 for d in batch],
                                        dtype=torch.float32),
            "is_reg": torch.tensor([d.is_reg for d in batch], dtype=torch.bool),
            "indices": torch.tensor([d.index for d in batch], dtype=torch.long),
        }

    def loader(self, epoch: int, *, start_batch: int = 0) -> DataLoader[dict[str, Any]]:
        """Iterable over the batch dicts of ``epoch`` from ``start_batch`` on (a resumed run skips the
        batches it already trained; the rest are exactly those of an uninterrupted run).

        Each dict: ``captions`` (processed), ``pixels`` ``[B, 3, H, W]`` in [-1, 1] or None when latents are
        cached, ``cache_keys`` (the :class:`CacheEntry` keys to look up) or None, ``loss_weight`` ``[B]``
        (1 for train, ``prior_loss_weight`` for reg), ``is_reg`` ``[B]`` bool, ``indices`` ``[B]`` into
        :attr:`items`. One DataLoader serves every epoch, so ``persistent_workers`` keeps its workers;
        iterate one epoch at a time.
        """
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must lie in [0, {self.num_batches}], got {start_batch}")
        self.batches(epoch)  # checks the epoch number here rather than in a worker
        if self._loader is None:
            self._sampler = _EpochSampler(self.num_batches)
            workers = self.cfg.num_workers
            # Every new iterator draws a base seed from the loader's generator: from the global torch RNG
            # without one, which would shift LoRA dropout's draws whenever a resumed run starts its epoch
            # iterator at another point than the uninterrupted run did. Nothing here uses that seed.
            self._loader = DataLoader(_Batches(self), batch_size=None, sampler=self._sampler,
                                      num_workers=workers, collate_fn=_identity,
                                      persistent_workers=self.cfg.persistent_workers and workers > 0,
                                      generator=torch.Generator().manual_seed(self.seed))
        assert self._sampler is not None
        self._sampler.epoch, self._sampler.start = epoch, start_batch
        return self._loader

    # --- caching and validation ---------------------------------------------------------------------------

    def cache_entries(self) -> list[CacheEntry]:
        """Every (item, orientation) an epoch can use, for encoding once: both orientations with
        ``flip_aug``; reg images the balancing leaves unused are skipped."""
        flips = (False, True) if self.cfg.flip_aug else (False,)
        return [CacheEntry(cache_key(item, fit, flip), index, flip, fit)
                for index, (item, fit, count) in enumerate(zip(self.items, self.fits, self.repeats, strict=True))
                if count for flip in flips]

    def load_entry_pixels(self, entry: CacheEntry) -> torch.Tensor:
        """The pixels to encode for ``entry``: centre crop, no colour jitter (cached latents cannot have it)."""
        return images.load_pixels(self.items[entry.item_index].path, entry.fit, flip=entry.flip)

    def val_pixels(self, items: Sequence[ImageItem]) -> list[tuple[Fit, torch.Tensor]]:
        """Validation images fitted to the same buckets, centre-cropped, never augmented."""
        out = []
        for item in items:
            fit = self.fit(item)
            out.append((fit, images.load_pixels(item.path, fit)))
        return out


class _Batches(Dataset[dict[str, Any]]):
    """Map-style dataset keyed by ``(epoch, batch_index)``; the sampler in the main process picks them."""

    def __init__(self, data: TrainData) -> None:
        self.data = data

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, batch_index = key
        return self.data.collate(epoch, batch_index)


class _EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, batch_index)`` for the epoch and start the main process last set."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches
        self.epoch = 1
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, b) for b in range(self.start, self.num_batches)])

    def __len__(self) -> int:
        return self.num_batches - self.start
