"""What the loop encodes once instead of every step: VAE latents of the training images (``data.cache_latents``)
and text-encoder hidden states of the captions when the text encoder is frozen.

Both go through the machine-wide content-addressed cache (:mod:`lorasweep.data.feature_cache`) when
``data.cache_to_disk`` is on, so a sweep's second trial — and every later run on the same model and data —
encodes nothing. Each entry is computed alone (a batch of one): a cached entry is then bitwise what a fresh
computation of that entry gives, whatever else was encoded beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lorasweep.data.feature_cache import FeatureCache, file_sha256, latent_key, text_key
from lorasweep.data.loader import CacheEntry, TrainData
from lorasweep.models.loading import BaseModel

DTYPE = "float32"


def text_encoder_identity(base: BaseModel) -> str:
    """The base's identity for cache keys (id + weights fingerprint); the text encoder is always the base's."""
    return f"{base.model_id}@{base.model_hash}"


def vae_identity(base: BaseModel) -> str:
    """The VAE's identity for cache keys: the replacement VAE's hash (``model.vae``), else the base's."""
    return f"vae@{base.vae_hash}" if base.vae_hash else text_encoder_identity(base)


def _moments(vae: torch.nn.Module, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The VAE posterior's parameters (mean and log-variance, ``[2C, h, w]``) of one image."""
    with torch.no_grad():
        return vae.encode(pixels[None].to(device)).latent_dist.parameters[0].float()


def sample_latents(moments: Sequence[torch.Tensor], vae: torch.nn.Module,
                   generator: torch.Generator | None) -> list[torch.Tensor]:
    """Latents × scaling factor: one posterior sample per image from ``generator`` (kohya samples once at
    caching time too), or the posterior mean without one."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    out = []
    for m in moments:
        dist = DiagonalGaussianDistribution(m[None])
        z = dist.mean if generator is None else dist.sample(generator=generator)
        out.append(z[0] * vae.config.scaling_factor)
    return out


def latent_moments(data: TrainData, entries: Sequence[CacheEntry], base: BaseModel, device: torch.device,
                   store: FeatureCache | None, *, device_tag: str) -> list[torch.Tensor]:
    """The posterior moments of every cache entry (on ``device``), from the disk cache where present.
    ``device_tag`` is the device part of the keys (:func:`lorasweep.training.kernels.kernels_tag`)."""

    def compute(indices: list[int]) -> list[dict[str, torch.Tensor]]:
        return [{"moments": _moments(base.vae, data.load_entry_pixels(entries[i]), device)} for i in indices]

    if store is None:
        return [r["moments"] for r in compute(list(range(len(entries))))]
    keys = [latent_key(vae_id=vae_identity(base), image_sha256=file_sha256(data.items[e.item_index].path),
                       bucket=e.fit.bucket, resized=e.fit.resized, crop=e.fit.centre_crop, flip=e.flip,
                       device_type=device_tag, dtype=DTYPE) for e in entries]
    found = store.get_or_compute(keys, compute, lock_name=f"latents-{vae_identity(base)}")
    return [r["moments"].to(device) for r in found]


class FrozenTextStates:
    """Hidden states of captions under a frozen text encoder: each distinct caption is encoded once (alone),
    kept on the device for the run and, with a ``store``, on disk for later runs."""

    def __init__(self, base: BaseModel, encode: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
                 token_ids: Callable[[list[str]], torch.Tensor], *, clip_skip: int, max_token_length: int,
                 device: torch.device, store: FeatureCache | None) -> None:
        self.base = base
        self.encode = encode
        self.token_ids = token_ids
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length
        self.device = device
        self.store = store
        self.memory: dict[str, torch.Tensor] = {}

    def _key(self, caption: str) -> str:
        tokenizer = self.base.tokenizer
        return text_key(text_encoder_id=text_encoder_identity(self.base),
                        tokenizer_id=f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}", caption=caption,
                        clip_skip=self.clip_skip, max_token_length=self.max_token_length,
                        device_type=self.device.type, dtype=DTYPE)

    def _compute(self, captions: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        with torch.no_grad():
            return [{"hidden_states": self.encode(self.base.text_encoder, self.token_ids([c]))[0].float()}
                    for c in captions]

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in captions if c not in self.memory))
        if missing:
            if self.store is None:
                found = self._compute(missing)
            else:
                found = self.store.get_or_compute([self._key(c) for c in missing],
                                                  lambda idx: self._compute([missing[i] for i in idx]),
                                                  lock_name=f"text-{text_encoder_identity(self.base)}")
            for caption, entry in zip(missing, found, strict=True):
                self.memory[caption] = entry["hidden_states"].to(self.device)
        return torch.stack([self.memory[c] for c in captions])


def feature_store(cache_dir: str | None, kind: str, enabled: bool) -> FeatureCache | None:
    from lorasweep.config.paths import cache_root

    return FeatureCache(cache_root(cache_dir), kind) if enabled else None


def describe(stores: dict[str, FeatureCache | None]) -> dict[str, Any]:
    """``{"latents": {"hits": .., "built": ..}, ...}`` for run.json and the log."""
    return {kind: {"hits": s.hits, "built": s.built} for kind, s in stores.items() if s is not None}
