"""The process-level model cache hands a pristine base to each run of a process, and only a pristine one."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorasweep.config.model import ModelConfig
from lorasweep.config.network import NetworkConfig
from lorasweep.errors import UserError
from lorasweep.models import cache
from lorasweep.network.lora import inject_lora


def test_a_second_run_reuses_the_model_and_a_modified_one_is_reloaded(untrained_tiny: Path) -> None:
    cfg = ModelConfig(base=str(untrained_tiny))
    cache.clear()
    first = cache.acquire(cfg)
    again = cache.acquire(ModelConfig(base=str(untrained_tiny), clip_skip=2, max_token_length=150))
    assert not first.cached and again.cached and again.base is first.base
    with pytest.raises(UserError, match=r"model\.clip_skip: 40 skips more layers"):
        cache.acquire(ModelConfig(base=str(untrained_tiny), clip_skip=40))  # checked against the cached model

    network = inject_lora(first.base.unet, first.base.text_encoder, NetworkConfig(dim=2))
    assert not cache.is_pristine(first.base)
    cache.release(first.base)  # a run that failed to take its LoRA off: the model is dropped
    reloaded = cache.acquire(cfg)
    assert not reloaded.cached and reloaded.base is not first.base and cache.is_pristine(reloaded.base)
    network.remove()

    (untrained_tiny / "unet" / "config.json").touch()  # the model on disk changed: a miss
    assert not cache.acquire(cfg).cached
    cache.clear()
