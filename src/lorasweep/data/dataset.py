"""Scan a kohya-layout image folder, read captions, and split off validation images.

Layout: ``<root>/<repeats>_<concept>/<image>.<ext>`` with ``<image><caption_extension>`` beside it. The same
code reads the built-in synthetic set, a user's training folder and a regularisation folder. Pixels are
prepared by :mod:`lorasweep.data.images`, batches by :mod:`lorasweep.data.loader`.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lorasweep.config.data import DataConfig
from lorasweep.data import images
from lorasweep.data.buckets import Fit, fit_image
from lorasweep.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CONCEPT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageItem:
    """One image of the data set: where it is, its caption, and how often an epoch shows it."""

    path: Path
    caption: str
    repeats: int
    concept: str
    is_reg: bool = False
    """A regularisation (class) image: its loss is weighted by ``training.prior_loss_weight``."""
    size: tuple[int, int] = (0, 0)
    """Displayed (width, height) read from the file header at scan time; (0, 0) = not known."""


@dataclass(frozen=True)
class ScanResult:
    items: list[ImageItem]
    missing_captions: int


def scan_folder(root: Path, caption_extension: str, key: str = "data.train_dir", *,
                is_reg: bool = False) -> ScanResult:
    """List every image under ``root``'s ``<repeats>_<concept>`` folders with its caption and size.

    An image without a caption file trains with the empty caption (kohya does the same) and is counted and
    warned about, because it is usually a mistake worth seeing. Only a caption file's first non-blank line
    is the caption, as in kohya. ``key`` names the folder's config key in errors (``data.reg_dir`` for
    regularisation images, which get ``is_reg=True``).
    """
    if not root.exists():
        raise UserError(key, f"the folder {root} does not exist.",
                        "Point it at your image root (kohya layout: <repeats>_<concept>/ sub-folders).")
    if not root.is_dir():
        raise UserError(key, f"{root} is a file, not a folder.",
                        "Point it at the folder that holds the <repeats>_<concept>/ sub-folders.")
    concept_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _CONCEPT_DIR.match(p.name))
    if not concept_dirs:
        raise UserError(key, f"{root} has no <repeats>_<concept> sub-folder (e.g. 10_mychar).",
                        "Put your images into such a folder; the number is how often each image is seen "
                        "per epoch.")
    items: list[ImageItem] = []
    missing = 0
    multi_line = 0
    for concept_dir in concept_dirs:
        match = _CONCEPT_DIR.match(concept_dir.name)
        assert match is not None
        repeats, concept = int(match.group(1)), match.group(2)
        if repeats < 1:
            raise UserError(key, f"{concept_dir} has 0 repeats, so its images would never be seen.",
                            "Rename it with a repeat count of at least 1, e.g. 1_" + concept + ".")
        for image_path in sorted(concept_dir.iterdir()):
            if image_path.suffix.lower() not in IMAGE_EXTENSIONS or not image_path.is_file():
                continue
            size = images.probe_image(image_path)
            caption_path = image_path.with_suffix(caption_extension)
            if caption_path.is_file():
                lines = [line.strip() for line in _read_caption(caption_path).splitlines() if line.strip()]
                caption = lines[0] if lines else ""
                multi_line += len(lines) > 1
            else:
                missing += 1
                log.warning("no caption file %s: training %s with the empty caption", caption_path.name,
                            image_path)
                caption = ""
            items.append(ImageItem(image_path, caption, repeats, concept, is_reg=is_reg, size=size))
    if not items:
        raise UserError(key, f"no images ({', '.join(IMAGE_EXTENSIONS)}) were found under {root}.",
                        "Add images to its <repeats>_<concept> sub-folders.")
    if missing:
        log.warning("%d of %d images have no %s caption file", missing, len(items), caption_extension)
    if multi_line:
        log.warning("%d caption files under %s have more than one line; only the first is used (as in kohya)",
                    multi_line, root)
    return ScanResult(items, missing)


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(str(path), f"is not UTF-8 text ({exc.reason} at byte {exc.start}).",
                        "Save the caption file as UTF-8.") from None


def fit_item(item: ImageItem, cfg: DataConfig, buckets: list[tuple[int, int]]) -> Fit:
    """The bucket and resize size of ``item`` among ``buckets`` (``make_buckets`` of ``cfg``); a UserError naming
    the file when it cannot fit (e.g. smaller than the smallest bucket with upscaling off)."""
    size = item.size if min(item.size) > 0 else images.probe_image(item.path)
    return fit_image(size, cfg.size, cfg.buckets, buckets, where=str(item.path))


def split_validation(items: list[ImageItem], fraction: float, seed: int) -> tuple[list[ImageItem],
                                                                                  list[ImageItem]]:
    """Hold out a seeded ``fraction`` of the images (at least one, and at least one left to train on)."""
    if len(items) < 2:
        raise UserError("validation.split", f"the data set has only {len(items)} image; at least 2 are needed "
                        "to hold one out for the validation loss.", "Add more images.")
    n_val = min(max(1, round(len(items) * fraction)), len(items) - 1)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [it for i, it in enumerate(items) if i not in val_idx]
    val = [it for i, it in enumerate(items) if i in val_idx]
    return train, val


def check_readable(path: Path) -> None:
    """Fail before training, naming the file, rather than at the step that first loads it."""
    images.probe_image(path)
