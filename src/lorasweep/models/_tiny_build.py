"""How the embedded tiny model is built and pre-trained: components, the three training phases, saving.

Kept apart from :mod:`lorasweep.models.tiny` (the recipe's constants, the cache, verification), which every
run and sweep controller imports: finding the cached model must not load torch and diffusers.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lorasweep.data.synthetic import base_world_samples
from lorasweep.models import TINY_VERSION
from lorasweep.models.tiny import (
    _EMPTY_CAPTION_RATE,
    _MIN_SNR_GAMMA,
    _N_IMAGES,
    _N_UNET_IMAGES,
    _SEED,
    _TEXT_BATCH,
    _TEXT_LR,
    _TEXT_PRETRAIN_LR,
    _UNET_BATCH,
    _UNET_LR,
    _VAE_AUX_WEIGHT,
    _VAE_CROP,
    _VAE_CROP_BATCH,
    _VAE_FULL_BATCH,
    _VAE_FULL_FRACTION,
    _VAE_KL_WEIGHT,
    _VAE_LR,
    LATENT_SIZE,
    MANIFEST_NAME,
    RESOLUTION,
    file_hashes,
    recipe,
)

log = logging.getLogger(__name__)

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




def build(dest: Path, *, vae_steps: int, unet_steps: int, text_steps: int) -> dict[str, Any]:
    """:func:`lorasweep.models.tiny.build_tiny_model`."""
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
        "files": file_hashes(dest),
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


