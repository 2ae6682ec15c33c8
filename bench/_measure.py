"""Timing, CPU-time and memory measurement shared by the throughput benchmark's two loops.

Both loops call :meth:`StepClock.mark` once per finished optimizer step, right after the step's loss has
been read back to the host (both loops read it every step, as diffusers' ``train_text_to_image_lora.py``
does), so a mark means "that step's kernels are done" on CUDA too; the clock synchronises the device
anyway. The timed window runs from the mark of the last warm-up step to the mark of the last step, so
anything before it (model load, latent caching, step-0 validation) and after it (end validation, saving)
is outside.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch


def process_cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: the measure run.json records as ``peak_rss_mib``."""
    from lorasweep.job import peak_rss_mib

    return int(peak_rss_mib() * 2**20)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepClock:
    """Wall and CPU time at the end of every optimizer step, plus a per-step loss record.

    ``warmup``: steps excluded from the window. On CUDA the peak-memory counter is reset when the window
    opens, so ``cuda_window_peak_bytes`` is the steady-state training peak (no caching, no validation).
    """

    device: torch.device
    warmup: int
    marks: dict[int, tuple[float, float]] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    cuda_setup_peak_bytes: int | None = None

    def mark(self, step: int, loss: float | None = None) -> None:
        synchronize(self.device)
        self.marks[step] = (time.perf_counter(), process_cpu_seconds())
        if loss is not None:
            self.losses[step] = loss
        if step == self.warmup and self.device.type == "cuda":
            self.cuda_setup_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def window(self) -> tuple[float, float, float, float]:
        """(wall start, wall end, cpu start, cpu end) of the timed window."""
        last = max(self.marks)
        if self.warmup not in self.marks or last <= self.warmup:
            raise RuntimeError(f"no timed window: marks at {sorted(self.marks)[:5]}..., warm-up {self.warmup}")
        (w0, c0), (w1, c1) = self.marks[self.warmup], self.marks[last]
        return w0, w1, c0, c1

    def summary(self, batch_size: int) -> dict[str, Any]:
        w0, w1, c0, c1 = self.window()
        steps = max(self.marks) - self.warmup
        wall = w1 - w0
        out: dict[str, Any] = {
            "timed_steps": steps,
            "s_per_step": wall / steps,
            "steps_per_s": steps / wall,
            "samples_per_s": steps * batch_size / wall,
            "cpu_s_per_step": (c1 - c0) / steps,
            "peak_rss_bytes": peak_rss_bytes(),
            "losses": [self.losses[s] for s in sorted(self.losses)],
            "step_s": [self.marks[s][0] - self.marks[s - 1][0] for s in sorted(self.marks) if s - 1 in self.marks],
        }
        if self.device.type == "cuda":
            window_peak = torch.cuda.max_memory_allocated(self.device)
            out["cuda_window_peak_bytes"] = window_peak
            out["cuda_peak_bytes"] = max(window_peak, self.cuda_setup_peak_bytes or 0)
        return out


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures depend on: CPU count and model, library versions, the accelerator's name."""
    import diffusers
    import peft
    import transformers

    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def plain_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A fixed-width text table (the GPU machine may lack rich, so no dependency beyond the stdlib)."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    body = [fmt.format(*header), line, *(fmt.format(*map(str, r)) for r in rows)]
    return "\n".join([title, line, *body, line])
