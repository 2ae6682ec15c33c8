"""Training state for an exact resume: LoRA, optimizer, LR scheduler, grad scaler, every RNG and the data
position — never the frozen base (``accelerate.save_state`` would store the whole ≈4 GB SD-1.5 base too).

Layout of one state folder (``<run>/state/step-000120/``):

* ``lora.safetensors`` — the LoRA in kohya format, float32 (the training dtype, not ``precision.save``);
* ``training.pt`` — optimizer, scheduler and scaler state dicts and RNG states: tensors and plain Python
  values only, so it loads with ``torch.load(weights_only=True)``;
* ``state.json`` — step, epoch, batch position and the fingerprint of the settings a resume must not change.

A folder is written under a temporary name and renamed, so a crash mid-save leaves the previous state
intact and never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorasweep import _faults
from lorasweep.config.train import TrainConfig
from lorasweep.data.dataset import ImageItem
from lorasweep.errors import UserError, storage_error

LORA_FILE = "lora.safetensors"
TRAINING_FILE = "training.pt"
STATE_FILE = "state.json"
FORMAT_VERSION = 1

#: Keys whose change would make a resumed run something other than the continuation of the saved one.
_FINGERPRINT_KEYS = ("model.base", "model.vae", "model.v2", "model.v_parameterization", "model.clip_skip",
                     "model.max_token_length", "data", "network", "optimizer", "scheduler", "training.max_steps",
                     "training.epochs", "training.batch_size", "training.grad_accum_steps", "training.seed",
                     "training.max_grad_norm", "training.prior_loss_weight", "precision.mixed")


@dataclass(frozen=True)
class Position:
    """Where training stands: ``step`` optimizer steps done; the next micro-batch is ``batch`` of ``epoch``
    (1-based epochs, as kohya counts them)."""

    step: int
    epoch: int
    batch: int


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that define the trajectory, as plain values (compared key by key on resume)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(plain, dict)
    out: dict[str, Any] = {}
    for key in _FINGERPRINT_KEYS:
        node: Any = plain
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def data_fingerprint(items: Sequence[ImageItem]) -> str:
    """The data set as a resume must find it again: each image's concept folder, file name, size on disk,
    caption, repeats and role. Cheap (no image is read) and independent of where the folder now lies."""
    rows = sorted((it.concept, it.path.name, it.path.stat().st_size if it.path.exists() else -1, it.caption,
                   it.repeats, it.is_reg) for it in items)
    return _digest(rows)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _numpy_state() -> dict[str, Any]:
    """numpy's legacy global state as tensors and numbers (a raw ndarray would need an unsafe unpickler)."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def rng_states(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The global Python/numpy/torch(/CUDA) RNG states and those of the loop's own ``generators``."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: gen.get_state() for name, gen in generators.items()},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), int(numpy["pos"]),
                         int(numpy["has_gauss"]), float(numpy["cached_gaussian"])))
    torch.set_rng_state(states["torch"])
    for name, gen in generators.items():
        gen.set_state(states["generators"][name])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(folder: Path, *, cfg: TrainConfig, position: Position, lora: dict[str, torch.Tensor],
               optimizer: Any, scheduler: Any, scaler: Any, generators: dict[str, torch.Generator],
               data_digest: str | None = None, extra: dict[str, Any] | None = None,
               ema: dict[str, Any] | None = None) -> Path:
    """Write one state folder ``folder`` atomically (temporary sibling, then rename); never replaces one.
    A full or unwritable disk is a ``UserError`` that leaves the states saved before untouched.

    ``data_digest``: :func:`data_fingerprint` of the training (and regularisation) images.
    ``extra``: JSON-able run facts the continuation needs (e.g. the validation history so far).
    ``ema``: the EMA of the LoRA weights (:meth:`lorasweep.training.ema.LoraEma.state_dict`), when kept."""
    from safetensors.torch import save_file

    if folder.exists():
        raise UserError(str(folder), "already exists; refusing to overwrite a saved training state.",
                        "Resume into a new run folder.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fp = fingerprint(cfg)
    meta = {"format": FORMAT_VERSION, "step": position.step, "epoch": position.epoch, "batch": position.batch,
            "fingerprint": fp, "fingerprint_digest": _digest(fp), "data_digest": data_digest, "extra": extra or {}}
    try:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in lora.items()}, str(tmp / LORA_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": None if scaler is None else scaler.state_dict(),
                    "rng": rng_states(generators), "ema": ema}, tmp / TRAINING_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        _faults.on_write(folder, tmp / STATE_FILE)
        os.replace(tmp, folder)
    except OSError as exc:
        raise (storage_error(folder, exc) or exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@dataclass(frozen=True)
class SavedState:
    folder: Path
    position: Position
    lora: dict[str, torch.Tensor]
    training: dict[str, Any]
    extra: dict[str, Any]


def load_state_meta(folder: Path, cfg: TrainConfig, data_digest: str | None = None) -> dict[str, Any]:
    """Check a state folder against ``cfg`` and the data set (complete, same format, same trajectory-defining
    settings and images) and return its ``state.json``; cheap, so ``preflight`` runs it before anything starts.

    With ``resume.force`` a changed config or data set is accepted (``meta["forced"]`` lists what changed),
    except for the LoRA's shape and the optimizer (``optimizer.name``), whose saved tensors could not be loaded."""
    key = "resume.state_dir"
    if not folder.is_dir():
        raise UserError(key, f"{folder} is not a folder.",
                        "Point it at a run's state/step-NNNNNN folder (saved with output.save_state=true).")
    missing = [name for name in (LORA_FILE, TRAINING_FILE, STATE_FILE) if not (folder / name).is_file()]
    if missing:
        raise UserError(key, f"{folder} lacks {', '.join(missing)}, so it is not a complete training state.",
                        "Use another state folder of the run.")
    try:
        meta: dict[str, Any] = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(key, f"{folder / STATE_FILE} cannot be read ({exc}).",
                        "Use another state folder of the run.") from None
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(key, f"{folder} has state format {meta.get('format')}, this lorasweep reads "
                        f"{FORMAT_VERSION}.", "Resume with the lorasweep version that saved it.")
    saved, now = meta["fingerprint"], fingerprint(cfg)
    changed = [_change(k, saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
               if _digest(saved.get(k)) != _digest(now.get(k))]
    if data_digest is not None and meta.get("data_digest") not in (None, data_digest):
        changed.append("the data set (images added, removed, replaced or re-captioned)")
    if not changed:
        return meta
    unforceable = [k for k in changed if k.split(" ")[0] == "network"]
    if (saved.get("optimizer") or {}).get("name") != (now.get("optimizer") or {}).get("name"):
        unforceable.append("optimizer.name")
    if cfg.resume.force and not unforceable:
        return {**meta, "forced": changed}
    if unforceable:
        raise UserError(key, f"the config differs from the saved run's in {', '.join(changed)}; "
                        f"{' and '.join(unforceable)} cannot change on resume (the saved LoRA and optimizer "
                        "tensors would not fit).", "Resume with the run's own config.yaml, or start a new run "
                        "with network.init_weights=<its LoRA> instead.")
    raise UserError(key, f"the config differs from the saved run's in {', '.join(changed)}, so resuming would "
                    "not continue that run.", "Resume with the settings the state was saved with "
                    "(`lorasweep resume RUN` uses the run's config.yaml: undo edits made to it since) or start "
                    "a new run with network.init_weights=<its LoRA>; to continue anyway with the changes, add "
                    "resume.force=true (`lorasweep resume RUN --force`).")


def _change(key: str, saved: Any, now: Any) -> str:
    """``key (saved → now)`` for a plain value; just the key for a whole group (its diff would be long)."""
    if isinstance(saved, dict) or isinstance(now, dict):
        return key
    return f"{key} ({saved} → {now})"


def load_state(folder: Path, cfg: TrainConfig, data_digest: str | None = None) -> SavedState:
    """Read a state folder (checked by :func:`load_state_meta`) for the loop to continue from."""
    from safetensors.torch import load_file

    meta = load_state_meta(folder, cfg, data_digest)
    training = torch.load(folder / TRAINING_FILE, map_location="cpu", weights_only=True)
    position = Position(int(meta["step"]), int(meta["epoch"]), int(meta["batch"]))
    return SavedState(folder, position, load_file(str(folder / LORA_FILE)), training, meta.get("extra", {}))
