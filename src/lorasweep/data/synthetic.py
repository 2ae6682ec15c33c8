"""A tiny, fully synthetic captioned image world: coloured shapes on plain backgrounds.

Why it exists: the embedded default (``model.base=tiny``) must train a LoRA with no downloads and no GPU,
and the result must still *mean* something — validation loss has to fall, learning rates have to matter,
samples have to change. A world whose captions name exactly what is drawn (shape, colour, position,
background) gives a tiny text-to-image model something learnable in seconds.

Two parts:

* the **base world** (:func:`base_world_samples`) — what the tiny base model is pre-trained on;
* a **held-out concept**: the trigger word :data:`CONCEPT_WORD` (``"zorb"``) means an orange five-pointed
  star. Neither the colour orange nor the star shape ever appears in the base world, so a LoRA trained on
  :func:`write_concept_dataset` visibly teaches the model something new.

Everything is deterministic: ``random.Random`` for choices and jitter, Pillow for drawing (supersampled
and box-filtered, which is exact arithmetic), no torch. Same seed, same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock
from PIL import Image, ImageDraw

from lorasweep.errors import UserError
from lorasweep.tracking.files import install_dir

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "CONCEPT_COLOUR",
    "CONCEPT_SHAPE",
    "CONCEPT_WORD",
    "DEFAULT_PROMPTS",
    "IMAGE_SIZE",
    "MANIFEST_NAME",
    "POSITIONS",
    "SHAPES",
    "SYNTHETIC_VERSION",
    "WORDS",
    "base_world_samples",
    "caption_for",
    "concept_samples",
    "render_scene",
    "write_concept_dataset",
]

#: Bumped whenever drawing or captions change, so cached data sets built by older code are rebuilt.
SYNTHETIC_VERSION = 1

#: Native resolution: 64 px keeps the VAE (factor 8) latents at 8×8, cheap enough for a 2-core CPU.
IMAGE_SIZE = 64

#: RGB values of every colour the base world uses. Saturated and far apart so an 8×8 latent still
#: separates them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (245, 215, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (130, 50, 170),
    "gray": (128, 128, 128),
}

#: Background colours (any base colour; a scene never uses the shape's own colour as background).
BACKGROUNDS: tuple[str, ...] = tuple(COLOURS)

#: Base-world shapes. The concept's star is deliberately not among them.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

#: Position name → (caption phrase, centre as a fraction of the image side).
_POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "left": ("on the left", (0.27, 0.5)),
    "right": ("on the right", (0.73, 0.5)),
    "top": ("at the top", (0.5, 0.27)),
    "bottom": ("at the bottom", (0.5, 0.73)),
    "center": ("in the center", (0.5, 0.5)),
}
POSITIONS: tuple[str, ...] = tuple(_POSITIONS)

#: The LoRA concept's trigger word; it is the first caption tag so kohya's ``keep_tokens=1`` keeps it first.
CONCEPT_WORD = "zorb"
#: What ``zorb`` looks like: a shape and a colour the base world never shows.
CONCEPT_SHAPE = "star"
CONCEPT_COLOUR = "orange"
_CONCEPT_RGB = (250, 130, 20)

#: Sample prompts for the concept, used for sample images during and after LoRA training.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "zorb, on the left, blue background",
    "zorb, in the center, white background",
    "zorb, at the top, black background",
)

#: Name of the manifest that marks a complete data set written by :func:`write_concept_dataset`.
MANIFEST_NAME = ".lorasweep-synthetic.json"


def _words() -> tuple[str, ...]:
    words: list[str] = ["a", CONCEPT_WORD, "background"]
    words += list(COLOURS) + list(SHAPES)
    for phrase, _ in _POSITIONS.values():
        words += phrase.split()
    return tuple(dict.fromkeys(words))  # de-duplicated, order kept (stable vocab ids)


#: Every word any caption can contain; the offline tokenizer makes each one a single token.
WORDS: tuple[str, ...] = _words()

_SUPERSAMPLE = 4  # draw at 4× and box-filter down: anti-aliased edges, still exact and deterministic


def _rgb(colour: str) -> tuple[int, int, int]:
    if colour == CONCEPT_COLOUR:
        return _CONCEPT_RGB
    try:
        return COLOURS[colour]
    except KeyError:
        raise ValueError(f"unknown colour {colour!r}; known: {[*COLOURS, CONCEPT_COLOUR]}") from None


def _polygon(cx: float, cy: float, radii: list[float], start_deg: float) -> list[tuple[float, float]]:
    """Vertices at equal angles with the given radii (a regular polygon, or a star when radii alternate)."""
    n = len(radii)
    points = []
    for i, r in enumerate(radii):
        a = math.radians(start_deg + 360.0 * i / n)
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def render_scene(
    rng: random.Random,
    *,
    shape: str,
    colour: str,
    position: str,
    background: str,
    size: int = IMAGE_SIZE,
) -> Image.Image:
    """Draw one shape on a plain background.

    ``rng`` only adds small jitter (size, offset, and rotation for the star) so that images of the same
    caption differ a little, as real photos of one concept do; the caption stays exactly true.
    ``shape``/``colour`` may also be the concept's (``"star"``, ``"orange"``).
    """
    if position not in _POSITIONS:
        raise ValueError(f"unknown position {position!r}; known: {list(_POSITIONS)}")
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), _rgb(background))
    draw = ImageDraw.Draw(image)
    fx, fy = _POSITIONS[position][1]
    jitter = 0.05 * big
    cx = fx * big + rng.uniform(-jitter, jitter)
    cy = fy * big + rng.uniform(-jitter, jitter)
    r = big * rng.uniform(0.16, 0.21)
    fill = _rgb(colour)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, [r * 1.1] * 3, -90.0), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, [r * 1.1] * 4, -90.0), fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == CONCEPT_SHAPE:
        outer = r * 1.15
        start = -90.0 + rng.uniform(-15.0, 15.0)
        draw.polygon(_polygon(cx, cy, [outer, outer * 0.42] * 5, start), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {[*SHAPES, CONCEPT_SHAPE]}")
    return image.resize((size, size), Image.Resampling.BOX)


def caption_for(*, shape: str, colour: str, position: str, background: str) -> str:
    """The kohya-style tag caption for a scene.

    Base world: ``"a red circle, on the left, blue background"``. The concept (orange star) is named
    only by its trigger word, which comes first: ``"zorb, on the left, blue background"`` — the LoRA has
    to learn what ``zorb`` looks like, which is the point of the held-out concept.
    """
    where = _POSITIONS[position][0]
    concept = shape == CONCEPT_SHAPE and colour == CONCEPT_COLOUR
    subject = CONCEPT_WORD if concept else f"a {colour} {shape}"
    return f"{subject}, {where}, {background} background"


def _base_scene(rng: random.Random) -> dict[str, str]:
    colour = rng.choice(tuple(COLOURS))
    background = rng.choice(tuple(b for b in BACKGROUNDS if b != colour))
    return {
        "shape": rng.choice(SHAPES),
        "colour": colour,
        "position": rng.choice(POSITIONS),
        "background": background,
    }


def _concept_scene(rng: random.Random) -> dict[str, str]:
    return {
        "shape": CONCEPT_SHAPE,
        "colour": CONCEPT_COLOUR,
        "position": rng.choice(POSITIONS),
        "background": rng.choice(BACKGROUNDS),
    }


def base_world_samples(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs of the base world — what the tiny base model is pre-trained on.

    Never contains the concept: no star, no orange, no ``zorb``.
    """
    rng = random.Random(f"lorasweep-base-{seed}")
    out = []
    for _ in range(n):
        scene = _base_scene(rng)
        out.append((render_scene(rng, **scene), caption_for(**scene)))
    return out


def concept_samples(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs of the held-out concept, each caption starting with ``zorb``.

    Positions and backgrounds are varied so the LoRA must bind ``zorb`` to the star itself, not to a place.
    Use a different ``seed`` than the training set's for a held-out validation set.
    """
    rng = random.Random(f"lorasweep-concept-{seed}")
    out = []
    for _ in range(n):
        scene = _concept_scene(rng)
        out.append((render_scene(rng, **scene), caption_for(**scene)))
    return out


# --------------------------------------------------------------------------------------------------------
# kohya-layout data set on disk


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _params(n_images: int, repeats: int, seed: int) -> dict[str, object]:
    return {
        "generator": "lorasweep.data.synthetic",
        "version": SYNTHETIC_VERSION,
        "concept": CONCEPT_WORD,
        "n_images": n_images,
        "repeats": repeats,
        "seed": seed,
    }


def _complete(root: Path, params: dict[str, object]) -> bool:
    """True when ``root`` holds a data set written with ``params`` whose files are all intact."""
    manifest = root / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("params") != params:
        return False
    files = data.get("files")
    if not isinstance(files, dict) or len(files) != 2 * int(params["n_images"]):  # type: ignore[call-overload]
        return False
    try:
        return all(_sha256(root / rel) == digest for rel, digest in files.items())
    except OSError:
        return False


def _iter_leftovers(root: Path) -> Iterator[Path]:
    yield from root.parent.glob(f".{root.name}.tmp-*")
    yield from root.parent.glob(f".{root.name}.old-*")


def write_concept_dataset(root: Path, *, n_images: int = 32, repeats: int = 4, seed: int = 0) -> Path:
    """Write the ``zorb`` concept in kohya's layout and return ``root``.

    Layout: ``root/<repeats>_zorb/0000.png`` + ``0000.txt`` … and a manifest ``root/.lorasweep-synthetic.json``.
    ``root`` belongs to this function: it holds exactly one data set, so a scanner of ``<repeats>_<name>``
    folders sees nothing else.

    * Idempotent: if ``root`` already holds a complete data set with the same parameters, nothing is
      written (mtimes stay) — sweeps call this from every trial.
    * Atomic: files go to a temporary sibling directory that is renamed into place with ``os.replace``, so
      a crash or a concurrent reader never sees half a data set. A file lock beside ``root`` serialises
      concurrent writers (parallel sweep trials).
    * Safe: a non-empty ``root`` without our manifest is user data and is never overwritten.
    """
    if n_images < 1:
        raise UserError("data.synthetic.n_images", f"must be at least 1, got {n_images}.")
    if repeats < 1:
        raise UserError("data.synthetic.repeats", f"must be at least 1, got {repeats}.")
    root = Path(root)
    params = _params(n_images, repeats, seed)
    if _complete(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if _complete(root, params):  # another process finished it while we waited
            return root
        if root.exists() and not (root / MANIFEST_NAME).exists() and any(root.iterdir()):
            raise UserError(
                str(root),
                "exists, is not empty and was not written by lorasweep's synthetic data generator.",
                "Choose another folder for the synthetic data set or empty this one.",
            )
        for leftover in _iter_leftovers(root):  # from a crashed writer; we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)

        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            folder = tmp / f"{repeats}_{CONCEPT_WORD}"
            folder.mkdir()
            files: dict[str, str] = {}
            for i, (image, caption) in enumerate(concept_samples(n_images, seed)):
                png = _png_bytes(image)
                txt = (caption + "\n").encode()
                for name, payload in ((f"{i:04d}.png", png), (f"{i:04d}.txt", txt)):
                    (folder / name).write_bytes(payload)
                    files[f"{folder.name}/{name}"] = hashlib.sha256(payload).hexdigest()
            manifest = {"params": params, "files": files}
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            install_dir(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root
