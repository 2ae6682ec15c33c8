"""Pixels: read any image file as RGB, fit it to its bucket, and apply kohya's augmentations.

The order is kohya's (``BaseDataset.__getitem__``): resize to ``Fit.resized``, crop to ``Fit.bucket``
(centre, or a given offset for ``random_crop``), colour jitter, horizontal flip, then scale to [-1, 1].
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lorasweep.data.buckets import Fit
from lorasweep.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are made: scanning a folder must not pay for it
    import torch

#: EXIF orientations that rotate by 90°: the displayed width and height are the stored ones swapped.
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
_DECODE_TO_CHECK = frozenset({"JPEG", "MPO", "BMP"})
"""Formats whose truncation only decoding shows (see :func:`probe_image`)."""
_READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError)

#: kohya's ``AugHelper.color_aug``: how often it acts, and its hue shift in OpenCV units (half-degrees).
COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8.0
GAMMA_RANGE = (0.95, 1.05)


def _unreadable(path: Path, exc: BaseException) -> UserError:
    return UserError(str(path), f"cannot be read as an image ({exc}).",
                     "Remove or replace the file, or move it out of the training folder.")


def probe_image(path: Path) -> tuple[int, int]:
    """The displayed (width, height) from the file header, after checking the file is an intact image.

    Cheap: PNG's ``verify`` checks every chunk's checksum and WebP's opening checks the container's length,
    without decoding; JPEG and BMP, whose header says nothing of the rest, are decoded — a JPEG at 1/8 scale
    (``draft``, a few ms), which still reads every byte — so a truncated file fails here, naming it, and not
    in the middle of training. EXIF rotation is
    honoured (as in any image viewer), so a portrait photo stored sideways gets a portrait bucket; kohya reads
    the stored size and trains such photos sideways.
    """
    try:
        with Image.open(path) as img:
            img.verify()  # must come straight after open; the image cannot be used after it
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS:
                width, height = height, width
            if img.format in _DECODE_TO_CHECK:
                img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))  # JPEG decodes smaller
                img.load()
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    return width, height


def load_rgb(path: Path) -> Image.Image:
    """Decode any mode (RGBA, LA, L, P, CMYK, I;16 ...) into an upright RGB image."""
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright)
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Composite transparency onto white and convert everything else to RGB.

    kohya drops the alpha channel instead, which shows whatever colour the transparent pixels happen to
    store (often black); white is what the image looks like on a page.
    """
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit greyscale: PIL would clip it at 255
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """kohya's choice of filter: area averaging (PIL's BOX) when shrinking, Lanczos when enlarging."""
    if image.size == size:
        return image
    shrinking = size[0] <= image.size[0] and size[1] <= image.size[1]
    return image.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)


def random_crop_offset(fit: Fit, rng: random.Random) -> tuple[int, int]:
    """A uniform (left, top) over every crop that stays inside the resized image (kohya's ``randint``)."""
    room_w, room_h = fit.crop_room
    return rng.randint(0, room_w), rng.randint(0, room_h)


def color_augment(array: np.ndarray, rng: random.Random) -> np.ndarray:
    """kohya's colour jitter on an ``[H, W, 3]`` uint8 image: with probability 0.33 either a hue shift of
    up to ±8 OpenCV units (±16°) or a random gamma in [0.95, 1.05], each half of the time.

    The gamma is a true gamma on [0, 1] values, which is what kohya's code means to do (its comment cites
    albumentations' ``RandomGamma``); kohya computes ``pixel ** gamma`` on 0-255 values instead, which
    brightens or darkens far more than ±5 %.
    """
    if rng.random() > COLOR_AUG_PROBABILITY:
        return array
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT) / 180.0  # fraction of the hue circle
        hsv = np.asarray(Image.fromarray(array).convert("HSV")).copy()
        hsv[..., 0] = np.round(hsv[..., 0].astype(np.float64) + shift * 256.0).astype(np.int64) % 256
        return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    gamma = rng.uniform(*GAMMA_RANGE)
    scaled = np.power(array.astype(np.float64) / 255.0, gamma) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def load_pixels(path: Path, fit: Fit, *, flip: bool = False, crop: tuple[int, int] | None = None,
                color_rng: random.Random | None = None) -> torch.Tensor:
    """The ``[3, H, W]`` float tensor in [-1, 1] (the VAE's input range) of ``path`` fitted to ``fit``.

    ``crop`` is the (left, top) offset into the resized image (None = centred); ``color_rng`` turns on
    kohya's colour jitter, drawing from that generator; ``flip`` mirrors left-right.
    """
    image = resize(load_rgb(path), fit.resized)
    left, top = fit.centre_crop if crop is None else crop
    room_w, room_h = fit.crop_room
    if not (0 <= left <= room_w and 0 <= top <= room_h):
        raise ValueError(f"crop offset {(left, top)} lies outside [0, {room_w}] x [0, {room_h}] for {fit}")
    image = image.crop((left, top, left + fit.bucket[0], top + fit.bucket[1]))
    array = np.asarray(image, dtype=np.uint8)
    if color_rng is not None:
        array = color_augment(array, color_rng)
    if flip:
        array = array[:, ::-1]
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()
