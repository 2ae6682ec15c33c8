"""The process-level model cache: the one piece of global state lorasweep keeps.

A sweep runs dozens of trials on one base model; in a reused trial process (``lorasweep_process`` launcher,
Hydra's basic launcher, ``lorasweep queue``) each later trial takes the base already in memory instead of
loading 2-4 GB again. What makes that safe: the trainer never changes base weights (they are frozen; LoRA
lives in peft wrappers that :meth:`lorasweep.network.lora.LoraNetwork.remove` takes off again, giving back
the very module objects), and :func:`release` checks that every trial left the model pristine — a model
that was not is dropped and loaded afresh by the next trial.

One entry: a sweep over ``model.base`` holds one model at a time, not all of them.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from pathlib import Path
from typing import Any

from lorasweep.config.model import ModelConfig
from lorasweep.models.loading import BaseModel, check_loaded, load_base_model

log = logging.getLogger(__name__)

#: Fields of :class:`ModelConfig` that do not change what is loaded (checked against the loaded model instead).
_NOT_LOADING = ("clip_skip", "max_token_length")

_entry: tuple[tuple[Any, ...], BaseModel] | None = None


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The base model of one run, and whether it came from this process's cache."""

    base: BaseModel
    cached: bool
    seconds: float


def _file_identity(value: str | None) -> tuple[Any, ...]:
    """Size and mtime of a local file, or of every file in a local folder: a model replaced on disk is a miss."""
    if not value:
        return ()
    path = Path(value).expanduser()
    if path.is_file():
        stat = path.stat()
        return (stat.st_size, stat.st_mtime_ns)
    if path.is_dir():
        return tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in sorted(path.rglob("*")) if p.is_file())
    return ()


def cache_key(cfg: ModelConfig) -> tuple[Any, ...]:
    loading = tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in _NOT_LOADING)
    return (*loading, _file_identity(cfg.base), _file_identity(cfg.vae), _file_identity(cfg.tokenizer))


def acquire(cfg: ModelConfig) -> Loaded:
    """The base model for ``cfg``: the cached one when it matches and is pristine, else freshly loaded (and
    cached in place of the previous entry)."""
    global _entry
    start = time.perf_counter()
    key = cache_key(cfg)
    if _entry is not None and _entry[0] == key and is_pristine(_entry[1]):
        check_loaded(_entry[1], cfg)
        return Loaded(_entry[1], True, time.perf_counter() - start)
    clear()
    base = load_base_model(cfg)
    _entry = (key, base)
    return Loaded(base, False, time.perf_counter() - start)


def is_pristine(base: BaseModel) -> bool:
    """No adapter left in the modules and every base parameter frozen, as :func:`load_base_model` made them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in (base.unet, base.vae, base.text_encoder):
        if any(isinstance(m, BaseTunerLayer) for m in module.modules()):
            return False
        if any(p.requires_grad for p in module.parameters()):
            return False
    return True


def release(base: BaseModel) -> None:
    """After a run: keep ``base`` for the next run of this process if it is pristine, else drop it."""
    if _entry is not None and _entry[1] is base and not is_pristine(base):
        log.warning("the base model was left modified by the run; the next run loads it again")
        clear()


def clear() -> None:
    """Forget the cached model and give its memory back (CPU and GPU)."""
    global _entry
    if _entry is None:
        return
    _entry = None
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
