"""Which kernels a CPU run's convolutions use (``training.cpu_conv_kernels``).

PyTorch runs float32 CPU convolutions through oneDNN. oneDNN converts each weight to its blocked layout on
every call (eager mode keeps no converted copy, and a frozen base is converted again every step), a cost
that grows with the weight while the useful work grows with weight × batch × pixels. Where batch × pixels is
small — the UNet's 16/8/4-pixel latent levels at 256 px, the tiny model's 8×8 latents at batch 4 — the
conversion costs more than the convolution, and PyTorch's native kernel (im2col + MKL GEMM on the weight
as it is) wins; on large maps oneDNN wins. Measured on a 2-core AVX2 EPYC, SD-1.5 UNet at 256 px, batch 1,
forward + backward of the convolutions: 8×8 maps 1.41 s oneDNN vs 0.53 s native, 4×4 0.70 vs 0.35,
16×16 0.65 vs 0.56, 32×32 0.51 vs 0.65; the VAE encoder (256…32-pixel maps) 2.8 s oneDNN vs 5.1 s native;
the tiny UNet at batch 32 (its pre-training) is faster on oneDNN.

So ``auto`` decides per call: a convolution with a large weight (:data:`NATIVE_MIN_WEIGHT`) whose input has
at most :data:`NATIVE_MAX_POSITIONS` batch × pixel positions runs PyTorch's native kernel (``thnn_conv2d``,
whose backward is native too); the others go through ``torch.nn.Conv2d`` as usual.

On large maps a 3×3 convolution does fewer multiplications as a Winograd transform than as a GEMM. PyTorch
ships NNPACK's (F(6×6, 3×3) tiles) but picks it only for batches of 16 and more. Where no gradient is needed —
the frozen VAE encoding images (every step without a latent cache, and when the cache is built), decoding
samples, validation — ``auto`` calls it for inputs of at least :data:`WINOGRAD_MIN_POSITIONS` positions and
weights of at least :data:`WINOGRAD_MIN_WEIGHT` elements, in runs of at most :data:`WINOGRAD_MAX_THREADS`
threads. Its results differ from the GEMM kernels' in the last bits (≈2e-5 of the output's scale), so the
latent cache keys say which kernels encoded (:func:`kernels_tag`).

All of this applies to float32 CPU runs only: CUDA uses cuDNN, and under bf16/fp16 autocast the native kernel
would skip the cast. ``native`` turns oneDNN off for the whole run (``torch.backends.mkldnn.enabled``),
``onednn`` leaves PyTorch's defaults.

Both switches are process-wide (``Conv2d._conv_forward`` and the oneDNN flag), so :func:`conv_kernels` sets
them for one run and puts them back however the run ends: a reused worker's next run starts clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lorasweep.config.training import CPU_CONV_KERNELS

NATIVE_MAX_POSITIONS = 256
"""Batch × height × width of a convolution's input up to which ``auto`` runs the native kernel (measured:
native faster at 256 and below on SD-1.5 layers, oneDNN at 1024 and above, and on the tiny UNet at batch
32, whose levels hold 2048 and 512 positions)."""

NATIVE_MIN_WEIGHT = 2**20
"""Weight elements from which ``auto`` considers the native kernel: oneDNN converts small weights cheaply
(measured: the tiny model's VAE, ≤ 0.1 M-element weights, encodes batch 4 faster on oneDNN throughout —
0.076 vs 0.095 s per training step), while SD-1.5's small-map convolutions hold 3.7–14.7 M elements."""

WINOGRAD_MIN_POSITIONS = 4096
"""Batch × height × width of a 3×3 convolution's input from which ``auto`` runs NNPACK's Winograd kernel when
no gradient is needed. Measured (2-core AVX2 EPYC, batch 1, forward, vs oneDNN): 256² maps × 128 channels
1.9× faster, 128² × 256 3.0×, 64² × 512 1.9×; 32² × 512 0.87× and smaller maps slower still."""

WINOGRAD_MIN_WEIGHT = 2**16
"""Weight elements from which ``auto`` considers the Winograd kernel (SD's VAE: 0.15–2.4 M; the tiny model's
VAE, ≤ 37 k elements, encodes faster on oneDNN)."""

WINOGRAD_MAX_THREADS = 8
"""Intra-op threads up to which ``auto`` uses the Winograd kernel. NNPACK runs its own thread pool beside
PyTorch's OpenMP one; measured on a 16-core AVX-512 Xeon, SD's VAE at 256 px, encode / decode vs oneDNN:
2 threads 1.35–1.52 → 1.13–1.21 s / 3.76–4.46 → 2.32–2.36 s, 4 threads 0.85–0.96 → 0.54–0.66 / 1.58–2.14 →
1.14–1.16, 8 threads 0.49–0.54 → 0.31–0.35 / 1.12 → 0.65–0.66, but 16 threads 0.30 → 0.62–0.75 / 0.67–0.71 →
0.99–1.06 (slower). NNPACK sizes its pool once per process, at its first call."""

_conv_forward = torch.nn.Conv2d._conv_forward


def _plain_cpu_float32(conv: torch.nn.Conv2d, input: torch.Tensor) -> bool:
    """A float32 CPU convolution of a 4-D input, ungrouped, undilated, zero-padded: the cases both per-call
    alternatives to ``Conv2d``'s own kernel handle."""
    return (input.dim() == 4 and input.device.type == "cpu" and input.dtype == torch.float32 and conv.groups == 1
            and conv.padding_mode == "zeros" and all(d == 1 for d in conv.dilation))


def _positions(input: torch.Tensor) -> int:
    """Batch × height × width of an NCHW input."""
    return input.shape[0] * input.shape[2] * input.shape[3]


def _winograd_fits(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> bool:
    if weight.numel() < WINOGRAD_MIN_WEIGHT or (torch.is_grad_enabled() and (
            input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return False
    return (_plain_cpu_float32(conv, input) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and input.is_contiguous() and _positions(input) >= WINOGRAD_MIN_POSITIONS)


def _size_aware_conv_forward(self: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None) -> torch.Tensor:
    # The cheap tests first: every convolution of a step passes through here (most of them small).
    if (weight.numel() >= NATIVE_MIN_WEIGHT and _plain_cpu_float32(self, input)
            and not isinstance(self.padding, str) and _positions(input) <= NATIVE_MAX_POSITIONS):
        return torch._C._nn.thnn_conv2d(input, weight, self.kernel_size, bias, self.stride, self.padding)
    return _conv_forward(self, input, weight, bias)


def _size_aware_winograd_conv_forward(self: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor,
                                      bias: torch.Tensor | None) -> torch.Tensor:
    if _winograd_fits(self, input, weight, bias):
        return torch._nnpack_spatial_convolution(input, weight, bias, [1, 1])
    return _size_aware_conv_forward(self, input, weight, bias)


def kernel_mode(setting: str, device: torch.device, mixed: str) -> str:
    """What ``setting`` means for a run: ``size`` (per call), ``native``, ``onednn`` or ``default`` (not
    touched: CUDA, or ``auto`` under autocast)."""
    if setting not in CPU_CONV_KERNELS:
        raise ValueError(f"cpu_conv_kernels must be one of {CPU_CONV_KERNELS}, not {setting!r}")
    if device.type != "cpu" or (setting == "auto" and mixed != "no"):
        return "default"
    return {"auto": "size"}.get(setting, setting)


@contextmanager
def conv_kernels(setting: str, device: torch.device, mixed: str) -> Iterator[dict[str, Any]]:
    """Apply ``setting`` inside the block; yields what was applied (recorded in run.json)."""
    mode = kernel_mode(setting, device, mixed)
    applied: dict[str, Any] = {"mode": mode}
    winograd = (mode == "size" and torch.get_num_threads() <= WINOGRAD_MAX_THREADS
                and torch.backends.nnpack.is_available())  # the check also initialises NNPACK
    if mode == "size":
        applied.update(native_max_positions=NATIVE_MAX_POSITIONS, native_min_weight=NATIVE_MIN_WEIGHT)
    if winograd:
        applied.update(winograd_min_positions=WINOGRAD_MIN_POSITIONS, winograd_min_weight=WINOGRAD_MIN_WEIGHT)
    previous_flag = torch.backends.mkldnn.enabled
    previous_forward = torch.nn.Conv2d._conv_forward
    try:
        if mode == "size":
            torch.nn.Conv2d._conv_forward = (  # type: ignore[method-assign]
                _size_aware_winograd_conv_forward if winograd else _size_aware_conv_forward)
        elif mode == "native":
            torch.backends.mkldnn.enabled = False
        yield applied
    finally:
        torch.nn.Conv2d._conv_forward = previous_forward  # type: ignore[method-assign]
        torch.backends.mkldnn.enabled = previous_flag


def kernels_tag(device: torch.device, applied: dict[str, Any]) -> str:
    """``device.type``, and on the CPU which convolution kernels ran (``applied`` from :func:`conv_kernels`):
    the device part of a latent cache key, so an entry is reused only where a fresh encode gives the same bits."""
    if device.type != "cpu" or applied.get("mode", "default") in ("default", "onednn"):  # PyTorch's own choice
        return device.type
    return "cpu:" + ",".join(f"{key}={value}" for key, value in sorted(applied.items()))
