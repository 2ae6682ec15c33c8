"""Scan a kohya-layout image folder, read captions, prepare pixels, and split off validation images.

Layout: ``<root>/<repeats>_<concept>/<image>.<ext>`` with ``<image><caption_extension>`` beside it. The same
code reads the built-in synthetic set and a user's folder.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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


@dataclass(frozen=True)
class ScanResult:
    items: list[ImageItem]
    missing_captions: int


def scan_folder(root: Path, caption_extension: str, key: str = "data.train_dir") -> ScanResult:
    """List every image under ``root``'s ``<repeats>_<concept>`` folders with its caption.

    An image without a caption file trains with the empty caption (kohya does the same) and is counted and
    warned about, because it is usually a mistake worth seeing.
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
            check_readable(image_path)
            caption_path = image_path.with_suffix(caption_extension)
            if caption_path.is_file():
                caption = caption_path.read_text(encoding="utf-8").strip()
            else:
                missing += 1
                log.warning("no caption file %s: training %s with the empty caption", caption_path.name,
                            image_path)
                caption = ""
            items.append(ImageItem(image_path, caption, repeats, concept))
    if not items:
        raise UserError(key, f"no images ({', '.join(IMAGE_EXTENSIONS)}) were found under {root}.",
                        "Add images to its <repeats>_<concept> sub-folders.")
    if missing:
        log.warning("%d of %d images have no %s caption file", missing, len(items), caption_extension)
    return ScanResult(items, missing)


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
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(str(path), f"cannot be read as an image ({exc}).",
                        "Remove or replace the file, or move it out of the training folder.") from None


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """Read any image mode (RGBA, L, CMYK, P ...) as RGB, resize the shorter side to ``resolution`` and
    centre-crop; return a ``[3, H, W]`` float tensor in [-1, 1], the VAE's input range."""
    try:
        with Image.open(path) as img:
            img.load()
            image = _to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(str(path), f"cannot be read as an image ({exc}).",
                        "Remove or replace the file, or move it out of the training folder.") from None
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.LANCZOS)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Composite transparency onto white (as kohya does for RGBA) and convert everything else to RGB."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
