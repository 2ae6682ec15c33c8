"""The loop's cached latents and frozen-text states: a cache hit equals a fresh computation bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorasweep.config.data import DataConfig
from lorasweep.config.model import ModelConfig
from lorasweep.data.dataset import scan_folder
from lorasweep.data.feature_cache import FeatureCache
from lorasweep.data.loader import TrainData
from lorasweep.data.synthetic import write_concept_dataset
from lorasweep.models.loading import load_base_model
from lorasweep.models.text import encode_tokens, tokenize
from lorasweep.training.features import FrozenTextStates, latent_moments, sample_latents

pytestmark = pytest.mark.usefixtures("single_thread")


def test_cached_latents_and_text_states_equal_fresh_ones(untrained_tiny: Path, tmp_path: Path) -> None:
    base = load_base_model(ModelConfig(base=str(untrained_tiny)))
    items = scan_folder(write_concept_dataset(tmp_path / "data", n_images=4), ".txt").items
    data = TrainData(items, [], DataConfig(flip_aug=True), seed=0, batch_size=2, prior_loss_weight=1.0)
    entries = data.cache_entries()
    assert len(entries) == 8  # both orientations
    cpu = torch.device("cpu")
    store = FeatureCache(tmp_path / "cache", "latents")
    fresh = latent_moments(data, entries, base, cpu, None, device_tag="cpu")
    built = latent_moments(data, entries, base, cpu, store, device_tag="cpu")
    hit = latent_moments(data, entries, base, cpu, store, device_tag="cpu")
    assert (store.built, store.hits) == (8, 8)
    latent_moments(data, entries, base, cpu, store, device_tag="cpu:mode=native")  # other kernels: other bits
    assert (store.built, store.hits) == (16, 8)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(fresh, built, hit, strict=True))
    assert not torch.equal(fresh[0], fresh[1])  # the flipped image is another latent
    z1 = sample_latents(hit, base.vae, torch.Generator().manual_seed(1))
    z2 = sample_latents(fresh, base.vae, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(z1, z2, strict=True))

    def encode(te: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return encode_tokens(te, ids, 2, max_token_length=75)

    def ids(captions: list[str]) -> torch.Tensor:
        return tokenize(base.tokenizer, captions, max_token_length=75)

    captions = [it.caption for it in items] + [items[0].caption, ""]
    text_store = FeatureCache(tmp_path / "cache", "text")
    kwargs = {"clip_skip": 2, "max_token_length": 75, "device": cpu}
    first = FrozenTextStates(base, encode, ids, store=text_store, **kwargs)(captions)
    again = FrozenTextStates(base, encode, ids, store=text_store, **kwargs)(captions)
    assert (text_store.built, text_store.hits) == (5, 5)  # 4 captions + the empty one, each encoded once
    with torch.no_grad():
        alone = torch.cat([encode(base.text_encoder, ids([c])) for c in captions])
    assert torch.equal(first, again) and torch.equal(first, alone)
