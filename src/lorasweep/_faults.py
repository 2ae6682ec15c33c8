"""Test-only fault injection, so failure paths can be tested on a machine without a GPU:
``LORASWEEP_FAULT=oom:step=10[:trial=1]`` raises a CUDA out-of-memory error (``torch.OutOfMemoryError``) when
training logs that step (in that sweep trial only); ``kill:step=10`` ends the process with SIGKILL there (a
crash nothing can clean up after); any other kind raises ``RuntimeError``. Unset in normal use; reading one
variable costs nothing."""

from __future__ import annotations

import os

ENV = "LORASWEEP_FAULT"


def inject(step: int, trial_number: int | None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    kind, *fields = spec.split(":")
    options = dict(field.split("=", 1) for field in fields)
    if int(options.get("step", -1)) != step:
        return
    if "trial" in options and (trial_number is None or int(options["trial"]) != trial_number):
        return
    if kind == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {ENV}={spec})")
    raise RuntimeError(f"injected fault ({ENV}={spec})")
