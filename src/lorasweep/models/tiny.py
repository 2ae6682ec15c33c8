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
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from lorasweep.data.synthetic import IMAGE_SIZE, base_world_samples
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
# components


def _unet(cross_attention_dim: int) -> Any:
    """SD-1.x UNet at toy width: CrossAttn blocks with the LoRA-target layer names, ~0.8M parameters."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=32,
        cross_attention_dim=cross_attention_dim,
    )


def _vae() -> Any:
    """SD-1.x AutoencoderKL at toy width: 4 blocks (factor 8), 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,  # see the module docstring
        sample_size=RESOLUTION,
    )


def _text_encoder(tokenizer: Any) -> Any:
    """CLIP text transformer at toy width; ids consistent with the offline tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        projection_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _scheduler() -> Any:
    """SD-1.x's training noise schedule; samplers (DDIM, Euler...) can be built from its config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


# --------------------------------------------------------------------------------------------------------
# training


@contextmanager
def _private_rng(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (module initialisers use it) without disturbing the caller's stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _images_tensor(samples: list[tuple[Any, str]]) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.uint8) for image, _ in samples])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_lambda(total: int) -> Callable[[int], float]:
    """Short warm-up, then cosine decay to 10 %: quick progress early, a calm finish."""
    warmup = max(1, total // 20)

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup)
        return ramp * (0.55 + 0.45 * math.cos(math.pi * min(step, total) / max(1, total)))

    return factor


def _train_vae(vae: Any, images: torch.Tensor, steps: int, generator: torch.Generator) -> float:
    """Autoencoder pre-training; returns the last whole-image reconstruction MSE."""
    vae.train()
    with torch.no_grad():  # start with a near-deterministic posterior (std e^-3): sample ≈ mean early on
        vae.quant_conv.bias[vae.config.latent_channels :].fill_(-6.0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=_VAE_LR, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps))
    full_steps = math.ceil(steps * _VAE_FULL_FRACTION) if steps > 1 else steps
    last_mse = float("nan")
    for step in range(steps):
        full = step >= steps - full_steps
        batch = _VAE_FULL_BATCH if full else _VAE_CROP_BATCH
        idx = torch.randint(0, images.shape[0], (batch,), generator=generator)
        x = images[idx]
        if not full:
            cells = (images.shape[-1] - _VAE_CROP) // 8 + 1
            oy, ox = (torch.randint(0, cells, (2,), generator=generator) * 8).tolist()
            x = x[:, :, oy : oy + _VAE_CROP, ox : ox + _VAE_CROP]
        x = x.contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        mse = F.mse_loss(reconstruction, x)
        aux = F.mse_loss(posterior.mean[:, :3], F.avg_pool2d(x, 8))
        loss = mse + _VAE_KL_WEIGHT * posterior.kl().mean() + _VAE_AUX_WEIGHT * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        last_mse = float(mse.detach())
    vae.eval()
    return last_mse


def _train_text_encoder(text_encoder: Any, input_ids: torch.Tensor, steps: int, generator: torch.Generator) -> float:
    """Teach the text encoder to summarise a caption in its padding positions; returns the last loss.

    A linear head on the last position predicts which words the caption holds (multi-label over the words
    that occur); CLIP's causal attention lets that position see the whole caption, and the padding positions
    before it learn the same summary, so the UNet's cross-attention finds the caption wherever it looks.
    """
    special = torch.tensor([int(input_ids[0, 0]), int(input_ids[0, -1])])  # <|startoftext|>, padding
    words = torch.zeros(len(input_ids), int(input_ids.max()) + 1)
    words.scatter_(1, input_ids, 1.0)
    words[:, special] = 0.0
    words = words[:, words.sum(0) > 0]
    head = torch.nn.Linear(text_encoder.config.hidden_size, words.shape[1])
    with _private_rng(_SEED + 3):
        head.reset_parameters()
    text_encoder.train()
    params = list(text_encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=_TEXT_PRETRAIN_LR, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, len(input_ids), (_TEXT_BATCH,), generator=generator)
        last = text_encoder(input_ids[idx])[0][:, -1]
        loss = F.binary_cross_entropy_with_logits(head(last), words[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    text_encoder.eval()
    return float(loss.detach())


@torch.no_grad()
def _encode(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of ``images``, so UNet steps only draw ``mean + std·ε`` (no VAE in the loop)."""
    means, stds = [], []
    for chunk in images.split(128):
        dist = vae.encode(chunk.contiguous(memory_format=torch.channels_last)).latent_dist
        means.append(dist.mean.contiguous())
        stds.append(dist.std.contiguous())
    return torch.cat(means), torch.cat(stds)


def _train_unet(
    unet: Any,
    text_encoder: Any,
    scheduler: Any,
    latents: tuple[torch.Tensor, torch.Tensor],
    input_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    batches: torch.Tensor,
    scaling_factor: float,
    generator: torch.Generator,
) -> float:
    """SD's ε-prediction training of UNet + text encoder; returns the mean loss of the last 10 % of steps.

    ``batches`` (steps × batch) indexes ``latents`` / ``input_ids``; it is drawn up front so only the
    images actually used are encoded (a 2-step test build encodes 128 images, not all of them).
    """
    unet.train()
    text_encoder.train()
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": _UNET_LR},
            {"params": list(text_encoder.parameters()), "lr": _TEXT_LR},
        ],
        betas=(0.9, 0.99),
        weight_decay=0.0,  # weight decay would shrink unused token embeddings (e.g. "zorb") over time
    )
    steps, batch = batches.shape
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps))
    mean, std = latents
    alphas = scheduler.alphas_cumprod
    tail: list[float] = []
    for step, idx in enumerate(batches):
        eps_latent = torch.randn(mean[idx].shape, generator=generator)
        x0 = (mean[idx] + std[idx] * eps_latent) * scaling_factor
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, len(alphas), (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        drop = torch.rand(batch, generator=generator) < _EMPTY_CAPTION_RATE
        ids = torch.where(drop[:, None], empty_ids[None, :], input_ids[idx])
        hidden = text_encoder(ids)[0]
        prediction = unet(noisy, t, hidden).sample
        # min-SNR-γ weighting (Hang et al. 2023): plain ε-MSE spends most of its effort on the low-noise
        # steps; capping their weight converges noticeably faster, which counts with a few hundred steps.
        snr = a / (1.0 - a)
        weight = snr.clamp(max=_MIN_SNR_GAMMA) / snr
        loss = (weight * (prediction - noise).pow(2)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step >= steps - max(1, steps // 10):
            tail.append(float(loss.detach()))
    unet.eval()
    text_encoder.eval()
    return float(np.mean(tail)) if tail else float("nan")


# --------------------------------------------------------------------------------------------------------
# building, manifest, cache


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_hashes(root: Path) -> dict[str, str]:
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
    from diffusers import StableDiffusionPipeline

    from lorasweep.models.tokenizer import build_tokenizer

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; build_tiny_model writes a fresh folder")
    if min(vae_steps, unet_steps, text_steps) < 1:
        raise ValueError(f"need at least one step per phase, got vae_steps={vae_steps}, "
                         f"text_steps={text_steps}, unet_steps={unet_steps}")
    dest.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="lorasweep-tokenizer-") as tok_dir:
        tokenizer = build_tokenizer(Path(tok_dir))
    samples = base_world_samples(_N_IMAGES, seed=_SEED % 1000)
    images = _images_tensor(samples)
    captions = [caption for _, caption in samples]

    def tokenize(texts: list[str]) -> torch.Tensor:  # exactly as the SD pipeline encodes prompts
        length = tokenizer.model_max_length
        return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids

    input_ids = tokenize(captions)
    empty_ids = tokenize([""])[0]
    timings["data"] = time.perf_counter() - start

    with _private_rng(_SEED):
        vae = _vae().to(memory_format=torch.channels_last)
    with _private_rng(_SEED + 1):
        text_encoder = _text_encoder(tokenizer)
    with _private_rng(_SEED + 2):
        unet = _unet(text_encoder.config.hidden_size)
    scheduler = _scheduler()

    t0 = time.perf_counter()
    vae_mse = _train_vae(vae, images, vae_steps, torch.Generator().manual_seed(_SEED + 10))
    timings["vae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text_loss = _train_text_encoder(text_encoder, input_ids, text_steps, torch.Generator().manual_seed(_SEED + 40))
    timings["text"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    unet_generator = torch.Generator().manual_seed(_SEED + 20)
    batches = torch.randint(0, _N_UNET_IMAGES, (unet_steps, _UNET_BATCH), generator=unet_generator)
    used, batches = torch.unique(batches, return_inverse=True)  # encode each used image once
    mean, std = _encode(vae, images[used])
    draw = torch.randn(mean.shape, generator=torch.Generator().manual_seed(_SEED + 30))
    scaling_factor = round(1.0 / float((mean + std * draw).std()), 5)
    vae.register_to_config(scaling_factor=scaling_factor)
    timings["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    unet_loss = _train_unet(
        unet,
        text_encoder,
        scheduler,
        (mean, std),
        input_ids[used],
        empty_ids,
        batches,
        scaling_factor,
        unet_generator,
    )
    timings["unet"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vae = vae.to(memory_format=torch.contiguous_format)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(dest), safe_serialization=True)
    build_tokenizer(dest / "tokenizer")  # canonical files incl. vocab.json + merges.txt for transformers 4.x
    manifest = {
        "name": f"tiny-sd1-v{TINY_VERSION}",
        "resolution": RESOLUTION,
        "scaling_factor": scaling_factor,
        "recipe": recipe(vae_steps=vae_steps, unet_steps=unet_steps, text_steps=text_steps),
        "files": _file_hashes(dest),
    }
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    timings["save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    unet_params = sum(p.numel() for p in unet.parameters())
    log.info(
        "built tiny SD-1.x model in %.1f s (vae %.1f s, text %.1f s, unet %.1f s): vae mse %.4f, "
        "text loss %.4f, unet loss %.4f",
        timings["total"],
        timings["vae"],
        timings["text"],
        timings["unet"],
        vae_mse,
        text_loss,
        unet_loss,
    )
    return {
        "path": str(dest),
        "manifest": manifest,
        "vae_mse": vae_mse,
        "text_loss": text_loss,
        "unet_loss": unet_loss,
        "unet_params": unet_params,
        "seconds": timings,
    }


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
