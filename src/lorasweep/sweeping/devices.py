"""Which GPUs a sweep spreads its trials over (``hydra.launcher.devices`` of the ``lorasweep_process``
launcher): one trial per GPU, each trial process seeing only its own (``CUDA_VISIBLE_DEVICES``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from typing import Any

from lorasweep.errors import UserError

KEY = "hydra.launcher.devices"


def resolve_devices(spec: Any) -> list[str] | None:
    """``None`` (no pinning), ``auto`` (the GPUs this machine shows), a list of ids, or ``"0,1"``."""
    if spec is None:
        return None
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        ids = visible_gpus()
        if not ids:
            raise UserError(KEY, "is auto, but this machine shows no GPU (no CUDA_VISIBLE_DEVICES, and nvidia-smi "
                            "lists none).", "Set it to null to run without GPU pinning, or list the ids.")
        return ids
    items: Iterable[Any] = spec.split(",") if isinstance(spec, str) else spec
    try:
        ids = [str(item).strip() for item in items]
    except TypeError:
        raise UserError(KEY, f"is {spec!r}, not a list of GPU ids.", "Use e.g. [0,1] or auto.") from None
    if not ids or any(not i for i in ids) or len(set(ids)) != len(ids):
        raise UserError(KEY, f"is {spec!r}: it needs distinct, non-empty GPU ids.", "Use e.g. [0,1] or auto.")
    return ids


def visible_gpus() -> list[str]:
    """GPU ids from ``CUDA_VISIBLE_DEVICES`` when set, else from ``nvidia-smi`` (no CUDA is initialised here:
    the controller must not hold a GPU context its trials need)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [i.strip() for i in env.split(",") if i.strip() and i.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]
