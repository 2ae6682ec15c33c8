"""The tiny embedded SD-1.x pipeline: built from fixed seeds, pre-trained in ~80 s, cached on disk.

Why it exists: ``model.base=tiny`` must let anyone run ``lorasweep train`` (and the test suite) with no
GPU and no model hub, yet exercise the *real* code paths: a diffusers folder loaded with
``StableDiffusionPipeline.from_pretrained``, an SD-1.x UNet whose attention layers carry the same names
LoRA targets in a real checkpoint, an ``AutoencoderKL``, a ``CLIPTextModel`` and a CLIP tokenizer.

A randomly initialised model would make every LoRA experiment meaningless (samples are noise whatever the
learning rate), so :func:`build_tiny_model` pre-trains it briefly on the synthetic shape world
(:mod:`lorasweep.data.synthetic`):

1. the VAE as an autoencoder (MSE, a tiny KL term, plus an auxiliary loss pulling latent channels 0–2
   toward the 8×-downsampled image, which makes the latent space image-like as SD's is and speeds learning),
   mostly on 32-px crops (a quarter of the compute per sample; the VAE is convolutional) and at the end on
   whole 64-px images;
2. the text encoder alone to summarise its caption: a linear head on the last (padding) position predicts
   which words the caption holds. SD's CLIP arrives pre-trained; a random one gives the UNet's
   cross-attention nothing to read, and the UNet then ignores the prompt for many hundred steps (measured:
   the prompt's effect on ε after 300 UNet steps was 0.004 from a random text encoder, 0.024 from this
   one, 0.04 after 500 steps);
3. the UNet with SD's ε-prediction loss on the VAE's latents (``latent_dist.sample() * scaling_factor``),
   the text encoder following at a low learning rate, 10 % empty captions so classifier-free guidance
   works.

Everything is seeded with explicit generators, so a rebuild on the same machine and library versions is
bitwise identical (the manifest records the sha256 of every file). The held-out concept (``zorb``, an
orange star) is never shown to the base model.

What ~3 minutes of CPU buys (measured): the VAE reconstructs the world and the unseen orange star with the
right colours and soft, blob-like shapes (MSE ≈ 0.02 on [-1, 1] pixels); the UNet paints a blob of the
prompted shape colour on a background that still owes more to the seed than to the prompt. That is enough
for a LoRA to teach it a new word (``zorb`` → an orange star), which is what the embedded default is for.

Deliberate deviation from LDM defaults: the VAE uses ``norm_num_groups=8``. With 32 channels at full
resolution, 32 groups would mean one channel per group — an instance norm right before the output conv,
which erases each channel's absolute level, so flat background colours (and the concept's unseen orange)
cannot be reconstructed within the build budget (measured: reconstruction MSE 0.30 with 32 groups against
0.09 with 8 after the same 200 steps). diffusers' single-file loader keeps the group count when given the
diffusers folder as ``config=`` (verified bit-exact); only an LDM ``original_config`` YAML, which hard-codes
32 groups, cannot describe this VAE. The UNet keeps 32 groups.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from lorasweep.data.synthetic import IMAGE_SIZE
from lorasweep.models import TINY_VERSION
from lorasweep.tracking.files import install_dir

__all__ = [
    "LATENT_SIZE",
    "MANIFEST_NAME",
    "RESOLUTION",
    "TEXT_STEPS",
    "TINY_VERSION",
    "UNET_STEPS",
    "VAE_STEPS",
    "build_tiny_model",
    "ensure_tiny_model",
    "recipe",
    "tiny_model_dir",
    "verify_tiny_model",
]

log = logging.getLogger(__name__)

#: Training resolution of the tiny model (and the resolution samples should be generated at).
RESOLUTION = IMAGE_SIZE
#: VAE downsampling factor 8 (three downsamplings, as in SD-1.x) → 8×8 latents for 64-px images.
LATENT_SIZE = RESOLUTION // 8

#: Real pre-training length (optimizer steps) used by :func:`ensure_tiny_model`; tuned so the whole build
#: stays within ~3 min on a 2-core CPU. The VAE learns absolute colours abruptly between ~300 and ~350 steps
#: (MSE 0.07 → 0.02), so VAE_STEPS should not go below 350; the text encoder knows every caption's words
#: after ~75 steps; the UNet starts to follow the prompt's shape colour after ~300 steps.
VAE_STEPS = 350
TEXT_STEPS = 150
UNET_STEPS = 500

#: The manifest at the folder root: step counts, scaling factor and the sha256 of every other file.
MANIFEST_NAME = "lorasweep-tiny.json"

_SEED = 20240607
_N_IMAGES = 1024  # distinct base-world images; the world has ~1.4k captions, so this covers it well
_VAE_CROP = 32  # px; crops are 8-px aligned so latent cells line up with whole-image encoding
_VAE_CROP_BATCH = 16
_VAE_FULL_BATCH = 8
_VAE_FULL_FRACTION = 0.12  # last part of the VAE steps on whole images (GroupNorm/attention statistics)
_VAE_LR = 2e-3
_VAE_KL_WEIGHT = 1e-6
_VAE_AUX_WEIGHT = 1.0
_UNET_BATCH = 32
_N_UNET_IMAGES = 640  # the UNet sees the first 640 (encoding costs ~7 ms per image on 2 cores)
_TEXT_BATCH = 64
_TEXT_PRETRAIN_LR = 3e-3
_UNET_LR = 3e-3
_TEXT_LR = 1e-4  # while the UNet trains: keep the pre-trained summary, let it adapt a little
_EMPTY_CAPTION_RATE = 0.1
_MIN_SNR_GAMMA = 5.0

_UNET_PARAMS_RANGE = (500_000, 1_000_000)


# --------------------------------------------------------------------------------------------------------
# building, manifest, cache


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): _sha256(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def build_tiny_model(dest: Path, *, vae_steps: int, unet_steps: int, text_steps: int = TEXT_STEPS) -> dict[str, Any]:
    """Build, pre-train and save the tiny pipeline into ``dest`` (a diffusers folder); return a report.

    ``dest`` is created (it must not exist or be empty). Tests pass a few steps to check the plumbing and
    reproducibility in seconds; :func:`ensure_tiny_model` uses :data:`VAE_STEPS`, :data:`TEXT_STEPS` and
    :data:`UNET_STEPS`.
    The report holds the manifest (steps, scaling factor, sha256 per file — identical across rebuilds),
    final losses, the UNet parameter count and wall-clock seconds per phase (not part of the manifest,
    since timings are never reproducible).
    """
    from lorasweep.models._tiny_build import build

    return build(dest, vae_steps=vae_steps, unet_steps=unet_steps, text_steps=text_steps)


def recipe(*, vae_steps: int, unet_steps: int, text_steps: int = TEXT_STEPS) -> dict[str, Any]:
    """Everything that determines the weights besides library versions, recorded in the manifest.

    A cache built by an older recipe (e.g. by a development version with other hyper-parameters) no longer
    matches and is rebuilt, even when :data:`TINY_VERSION` was not bumped.
    """
    return {
        "version": TINY_VERSION,
        "seed": _SEED,
        "images": _N_IMAGES,
        "vae_steps": vae_steps,
        "vae": {
            "crop": _VAE_CROP,
            "crop_batch": _VAE_CROP_BATCH,
            "full_batch": _VAE_FULL_BATCH,
            "full_fraction": _VAE_FULL_FRACTION,
            "lr": _VAE_LR,
            "kl": _VAE_KL_WEIGHT,
            "aux": _VAE_AUX_WEIGHT,
        },
        "text_steps": text_steps,
        "text": {"batch": _TEXT_BATCH, "lr": _TEXT_PRETRAIN_LR},
        "unet_steps": unet_steps,
        "unet": {
            "images": _N_UNET_IMAGES,
            "batch": _UNET_BATCH,
            "lr": _UNET_LR,
            "text_lr": _TEXT_LR,
            "empty_caption_rate": _EMPTY_CAPTION_RATE,
            "min_snr_gamma": _MIN_SNR_GAMMA,
        },
    }


def verify_tiny_model(path: Path, *, expected_recipe: dict[str, Any] | None = None) -> bool:
    """True when ``path`` holds a complete tiny model whose every file matches its manifest's sha256.

    With ``expected_recipe``, the manifest's recipe must also equal it (see :func:`recipe`).
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        if expected_recipe is not None and manifest.get("recipe") != expected_recipe:
            return False
        files = manifest["files"]
        return bool(files) and all(_sha256(path / rel) == digest for rel, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _step_counts(vae_steps: int | None, text_steps: int | None, unet_steps: int | None) -> dict[str, int]:
    """The real step counts where an override is None."""
    return {
        "vae_steps": VAE_STEPS if vae_steps is None else vae_steps,
        "text_steps": TEXT_STEPS if text_steps is None else text_steps,
        "unet_steps": UNET_STEPS if unet_steps is None else unet_steps,
    }


def tiny_model_dir(cache_root: Path, *, vae_steps: int | None = None, text_steps: int | None = None,
                   unet_steps: int | None = None) -> Path:
    """Where :func:`ensure_tiny_model` keeps the model; non-default step counts get their own folder."""
    name = f"tiny-sd1-v{TINY_VERSION}"
    steps = _step_counts(vae_steps, text_steps, unet_steps)
    if steps != _step_counts(None, None, None):
        name += "-vae{vae_steps}-text{text_steps}-unet{unet_steps}".format(**steps)
    return Path(cache_root) / "models" / name


def ensure_tiny_model(cache_root: Path, *, vae_steps: int | None = None, text_steps: int | None = None,
                      unet_steps: int | None = None) -> Path:
    """Return the cached tiny model folder under ``cache_root/models``, building it once if needed.

    Safe for concurrent callers (parallel sweep trials): a file lock makes sure only one process builds,
    the build goes to a temporary sibling folder renamed into place when complete, and a present folder is
    used only if every file matches the manifest's sha256 and its recipe is the current one (a damaged or
    outdated one is rebuilt). The ``*_steps`` arguments override the real step counts (tests); such
    builds live in their own folder.
    """
    target = tiny_model_dir(cache_root, vae_steps=vae_steps, text_steps=text_steps, unet_steps=unet_steps)
    steps = _step_counts(vae_steps, text_steps, unet_steps)
    expected = recipe(**steps)
    if verify_tiny_model(target, expected_recipe=expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if verify_tiny_model(target, expected_recipe=expected):  # another process built it while we waited
            return target
        for leftover in target.parent.glob(f".{target.name}.tmp-*"):  # from a crashed build
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            log.info("building the tiny SD-1.x model into %s (one time, about three minutes)", target)
            build_tiny_model(tmp, **steps)
            install_dir(tmp, target)  # replaces an incomplete or damaged folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
